// Command echo is the SDK's test function: it echoes the payload, fails on
// "fail" and panics on "panic".
package main

import (
	"context"
	"errors"
	"strings"

	"vhive.dev/vhive/functions/sdk"
)

func handle(_ context.Context, payload string) (string, error) {
	switch payload {
	case "fail":
		return "", errors.New("echo: asked to fail")
	case "panic":
		panic("echo: asked to panic")
	}
	return "echo:" + strings.ToUpper(payload), nil
}

func main() { sdk.Run(handle) }
