// Command nnp is the stand-in for the e2e-test-images/nonewprivs image's
// program: installed setuid root, it prints its effective uid, which is 0
// unless the container runs with no_new_privs.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
