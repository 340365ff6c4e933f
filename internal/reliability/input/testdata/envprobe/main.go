// Command envprobe is a test function that reports one variable of its
// environment: payload KEY answers "<length> sha256:<hex>" of $KEY's value,
// or "unset".
package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"

	"vhive.dev/vhive/functions/sdk"
)

func main() {
	sdk.Run(func(ctx context.Context, payload string) (string, error) {
		v, ok := os.LookupEnv(payload)
		if !ok {
			return "unset", nil
		}
		return fmt.Sprintf("%d sha256:%x", len(v), sha256.Sum256([]byte(v))), nil
	})
}
