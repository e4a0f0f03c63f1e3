#include "cfuzzer.h"

// libFuzzer's own main (linked in whole) names this symbol; ours runs the driver with the target's
// callback instead, so this one is never called.
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    (void)data;
    (void)size;
    return 0;
}
