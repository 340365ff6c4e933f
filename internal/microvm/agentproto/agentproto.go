// Package agentproto is the protocol between the microvm backend (host) and
// vhive's guest agent (PID 1 in the microVM), spoken over a virtio-serial
// port named PortName: one JSON object per line, each with a Type.
//
// The host speaks first, so that nothing the guest writes is lost while the
// host side of the port is not yet connected (QEMU drops guest output then;
// host input waits until the guest opens the port):
//
//	host → guest  start   (config of the function; once, after boot)
//	guest → host  ready   (the function listens on its port)
//	guest → host  exit    (the function ended: status, stderr tail, OOM kill)
//	guest → host  error   (the agent could not start the function)
//	host → guest  resume  (after a restore: clock, entropy)
//	guest → host  resumed (clock set, RNG reseeded)
//
// The guest's network is configured once, by start: every guest has the
// same address (the host NATs each instance's own address to it), so clones
// of one snapshot keep the address they carry in memory.
package agentproto

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
)

// PortName is the virtio-serial port name of the agent channel.
const PortName = "vhive.agent"

// Message types.
const (
	TypeStart   = "start"
	TypeReady   = "ready"
	TypeExit    = "exit"
	TypeError   = "error"
	TypeResume  = "resume"
	TypeResumed = "resumed"
)

// MaxLine bounds one message (the stderr tail and the environment fit).
const MaxLine = 1 << 20

// Net is the guest's network configuration (eth0).
type Net struct {
	IP      string `json:"ip"`      // guest address, e.g. 172.16.0.2
	Bits    int    `json:"bits"`    // prefix length
	Gateway string `json:"gateway"` // default route
}

// Start is the function's configuration.
type Start struct {
	Args   []string `json:"args"`
	Env    []string `json:"env"`
	Cwd    string   `json:"cwd"`
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
	// Port is GUEST_PORT: ready is reported once something listens on it.
	Port int `json:"port"`
	Net  Net `json:"net"`
	// TimeUnixNano and Entropy as in Resume (the guest has no RTC it can
	// trust and an RNG seeded only by its boot).
	TimeUnixNano int64  `json:"time_unix_nano"`
	Entropy      []byte `json:"entropy"`
}

// Resume is sent after a restore. It carries no network: the guest keeps
// the address it had when the snapshot was taken.
type Resume struct {
	TimeUnixNano int64  `json:"time_unix_nano"`
	Entropy      []byte `json:"entropy"`
}

// Exit reports the function's end.
type Exit struct {
	// Status is the exit status, or -1 when Signal killed it.
	Status int    `json:"status"`
	Signal string `json:"signal,omitempty"`
	Stderr string `json:"stderr,omitempty"`
	// OOMKilled: the guest kernel's OOM killer ended the function (it died
	// of SIGKILL while the guest's oom_kill count in /proc/vmstat rose).
	OOMKilled bool `json:"oom_killed,omitempty"`
}

// Message is one line of the protocol. Exactly the field of its Type is
// set (none for ready and resumed).
type Message struct {
	Type   string  `json:"type"`
	Start  *Start  `json:"start,omitempty"`
	Resume *Resume `json:"resume,omitempty"`
	Exit   *Exit   `json:"exit,omitempty"`
	// Error is the agent's error text (TypeError) or a failed resume.
	Error string `json:"error,omitempty"`
}

// Write encodes m as one line.
func Write(w io.Writer, m Message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("agentproto: encode %s: %w", m.Type, err)
	}
	b = append(b, '\n')
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("agentproto: send %s: %w", m.Type, err)
	}
	return nil
}

// Reader decodes messages line by line.
type Reader struct{ sc *bufio.Scanner }

// NewReader reads messages from r.
func NewReader(r io.Reader) *Reader {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), MaxLine)
	return &Reader{sc: sc}
}

// Read returns the next message; io.EOF at the end of the stream.
func (r *Reader) Read() (Message, error) {
	for r.sc.Scan() {
		line := r.sc.Bytes()
		if len(line) == 0 {
			continue
		}
		var m Message
		if err := json.Unmarshal(line, &m); err != nil {
			return Message{}, fmt.Errorf("agentproto: bad message %.100q: %w", line, err)
		}
		if m.Type == "" {
			return Message{}, fmt.Errorf("agentproto: message without a type: %.100q", line)
		}
		return m, nil
	}
	if err := r.sc.Err(); err != nil {
		return Message{}, fmt.Errorf("agentproto: read: %w", err)
	}
	return Message{}, io.EOF
}
