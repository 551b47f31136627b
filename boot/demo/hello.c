/* The README's demo program: a static hello that tvix-boot imports into its store
 * and runs in a microVM with `tvix-boot --run`. Static, because the guest has
 * nothing but the store and this program has no store path for a libc. */
#include <stdio.h>

int main(int argc, char **argv) {
    printf("Hello from a tvix-boot guest!\n");
    for (int i = 1; i < argc; i++)
        printf("  argument %d: [%s]\n", i, argv[i]);
    return 0;
}
