// Command fibonacci computes Fibonacci numbers exactly (math/big).
//
// The payload is n (0 <= n <= 100000); "record" and "replay" select n = 10000
// and n = 20000. The reply is "fib(<n>) = <decimal digits>". Anything else is
// an error naming the payload.
package main

import (
	"context"
	"fmt"
	"math/big"
	"strconv"

	"vhive.dev/vhive/functions/sdk"
)

// maxN bounds the work of one call (fib(100000) has 20899 digits).
const maxN = 100000

func fib(n int) *big.Int {
	a, b := big.NewInt(0), big.NewInt(1)
	for range n {
		a.Add(a, b)
		a, b = b, a
	}
	return a
}

func parseN(payload string) (int, error) {
	switch payload {
	case "record":
		return 10000, nil
	case "replay":
		return 20000, nil
	}
	n, err := strconv.Atoi(payload)
	if err != nil || n < 0 || n > maxN {
		return 0, fmt.Errorf("fibonacci: payload %q is not an integer in [0, %d] nor record/replay", payload, maxN)
	}
	return n, nil
}

func handle(_ context.Context, payload string) (string, error) {
	n, err := parseN(payload)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("fib(%d) = %s", n, fib(n)), nil
}

func main() { sdk.Run(handle) }
