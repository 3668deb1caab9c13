"""Host-side integer helpers for the launchers. Recent Triton releases make triton.cdiv and
triton.next_power_of_2 constexpr functions usable inside kernels, whose call from Python costs
microseconds each; these plain versions cost nanoseconds (launchers call them on every op)."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
