// Runs the registered kernel tests whose name starts with argv[1] (all without an argument).
#include <cstdio>
#include <string>

#include "harness.h"

int main(int argc, char** argv) {
  const std::string prefix = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const auto& c : llmcore_test::registry()) {
    if (c.name.compare(0, prefix.size(), prefix) != 0) continue;
    const int before = llmcore_test::failures();
    c.fn();
    ++ran;
    std::printf("%-48s %s\n", c.name.c_str(), llmcore_test::failures() == before ? "ok" : "FAILED");
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test matches '%s'\n", prefix.c_str());
    return 1;
  }
  std::printf("%d tests, %d failed checks\n", ran, llmcore_test::failures());
  return llmcore_test::failures() == 0 ? 0 : 1;
}
