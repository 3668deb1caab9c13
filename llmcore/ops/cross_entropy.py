"""Placeholder: replaced by the cross-entropy work."""


def cross_entropy(*a, **k):
    raise NotImplementedError


def linear_cross_entropy(*a, **k):
    raise NotImplementedError
