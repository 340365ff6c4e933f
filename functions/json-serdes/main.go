// Command json-serdes serialises and deserialises JSON, like vSwarm's
// json_serdes.
//
// "record" and "replay" select built-in documents of 100 and 1000 records
// (set 1 and 2): each call encodes the set, decodes it back and checks the
// round trip; the reply is "json-serdes set=<n> records=<m> bytes=<len>
// sha256=<hex of the encoding>", the same in every instance. Any other payload
// must be a JSON document: it is decoded and re-encoded compactly with object
// keys sorted (numbers keep their text), and that is the reply.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"

	"vhive.dev/vhive/functions/sdk"
)

type address struct {
	Street string `json:"street"`
	City   string `json:"city"`
	Zip    string `json:"zip"`
}

type record struct {
	ID      int      `json:"id"`
	Name    string   `json:"name"`
	Email   string   `json:"email"`
	Active  bool     `json:"active"`
	Score   float64  `json:"score"`
	Tags    []string `json:"tags"`
	Address address  `json:"address"`
}

type document struct {
	Version int      `json:"version"`
	Records []record `json:"records"`
}

// inputSet is a deterministic document of n records.
func inputSet(n int) document {
	cities := []string{"Lausanne", "Edinburgh", "Zurich", "Geneva", "Glasgow"}
	tags := []string{"serverless", "snapshot", "reap", "gvisor", "wasm", "cold-start"}
	d := document{Version: 1, Records: make([]record, n)}
	for i := range d.Records {
		d.Records[i] = record{
			ID:      i,
			Name:    fmt.Sprintf("user-%05d", i),
			Email:   fmt.Sprintf("user-%05d@example.org", i),
			Active:  i%3 != 0,
			Score:   float64(i*37%1000) / 10,
			Tags:    []string{tags[i%len(tags)], tags[(i*7+1)%len(tags)]},
			Address: address{Street: fmt.Sprintf("%d Rue du Lac", i%200+1), City: cities[i%len(cities)], Zip: fmt.Sprintf("%04d", 1000+i%9000)},
		}
	}
	return d
}

type serdes struct {
	sets [2]document
}

func newSerdes() *serdes {
	return &serdes{sets: [2]document{inputSet(100), inputSet(1000)}}
}

func (s *serdes) roundTrip(set int) (string, error) {
	in := s.sets[set-1]
	enc, err := json.Marshal(in)
	if err != nil {
		return "", fmt.Errorf("json-serdes: encode set %d: %w", set, err)
	}
	var out document
	if err := json.Unmarshal(enc, &out); err != nil {
		return "", fmt.Errorf("json-serdes: decode set %d: %w", set, err)
	}
	if out.Version != in.Version || !slices.EqualFunc(out.Records, in.Records, recordEqual) {
		return "", fmt.Errorf("json-serdes: set %d does not survive a round trip", set)
	}
	return fmt.Sprintf("json-serdes set=%d records=%d bytes=%d sha256=%x", set, len(out.Records), len(enc), sha256.Sum256(enc)), nil
}

func recordEqual(a, b record) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Email == b.Email && a.Active == b.Active &&
		a.Score == b.Score && slices.Equal(a.Tags, b.Tags) && a.Address == b.Address
}

// canonical decodes one JSON document and re-encodes it compactly.
func canonical(payload string) (string, error) {
	dec := json.NewDecoder(bytes.NewReader([]byte(payload)))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return "", fmt.Errorf("json-serdes: payload is not a JSON document (nor record/replay): %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return "", errors.New("json-serdes: payload has data after the JSON document")
	}
	out, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("json-serdes: encode: %w", err)
	}
	return string(out), nil
}

func (s *serdes) handle(_ context.Context, payload string) (string, error) {
	switch payload {
	case "record":
		return s.roundTrip(1)
	case "replay":
		return s.roundTrip(2)
	}
	return canonical(payload)
}

func main() { sdk.Run(newSerdes().handle) }
