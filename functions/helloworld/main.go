// Command helloworld is vHive's hello-world function: it replies
// "Hello, <payload>!".
package main

import (
	"context"

	"vhive.dev/vhive/functions/sdk"
)

func handle(_ context.Context, name string) (string, error) {
	return "Hello, " + name + "!", nil
}

func main() { sdk.Run(handle) }
