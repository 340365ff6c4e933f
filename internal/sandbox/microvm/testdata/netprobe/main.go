// Command netprobe is the function the microvm network tests run: an HTTP
// server on $GUEST_PORT whose /dial?addr=HOST:PORT dials TCP from inside
// the guest (2 s timeout) and answers "connected" or "failed: <error>".
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	http.HandleFunc("/dial", func(w http.ResponseWriter, r *http.Request) {
		c, err := net.DialTimeout("tcp", r.URL.Query().Get("addr"), 2*time.Second)
		if err != nil {
			fmt.Fprintf(w, "failed: %v", err)
			return
		}
		c.Close()
		fmt.Fprint(w, "connected")
	})
	port := os.Getenv("GUEST_PORT")
	if port == "" {
		port = "8080"
	}
	if err := http.ListenAndServe(":"+port, nil); err != nil {
		fmt.Fprintln(os.Stderr, "netprobe:", err)
		os.Exit(1)
	}
}
