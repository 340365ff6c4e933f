// Command lr-serving is the Go twin of functions/python/lr-serving:
// sentiment analysis of product reviews with a logistic-regression model
// over hashed bag-of-words features, so the same work runs on gVisor, runc
// and wasm.
//
// At start-up it trains the model (its weight table, 2^16 float64 = 512 KiB)
// on 4000 synthetic reviews from a seeded generator, as the Python function
// loads the model trained at image build time. A request classifies a batch
// of generated reviews: 10 by default, 200 for "record", 500 for "replay".
// The reply is "lr-serving set=<n> reviews=<k> positive=<p> negative=<q>
// scores=<16 hex>", the same in every instance.
package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"hash/fnv"
	"math"
	"strings"

	"vhive.dev/vhive/functions/sdk"
)

const dims = 1 << 16

var (
	positive = strings.Fields("good great excellent love loved amazing perfect happy wonderful best recommend fast sturdy beautiful comfortable reliable pleasant nice fantastic")
	negative = strings.Fields("bad poor terrible hate hated awful broken slow worst refund disappointed cheap flimsy ugly useless noisy returned waste horrible annoying")
	neutral  = strings.Fields("the a it this product item box delivery price color size battery screen was is and but with for after week day order seller shipping")
	batches  = [3]struct{ seed, n uint64 }{{100, 10}, {101, 200}, {102, 500}}
)

// rng is splitmix64: small, deterministic, the same on every platform.
type rng struct{ x uint64 }

func (r *rng) next() uint64 {
	r.x += 0x9e3779b97f4a7c15
	z := r.x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
func (r *rng) float() float64         { return float64(r.next()>>11) / (1 << 53) }
func (r *rng) intn(n int) int         { return int(r.next() % uint64(n)) }
func (r *rng) pick(w []string) string { return w[r.intn(len(w))] }

type review struct {
	words []string
	label int
}

func dataset(seed, n uint64) []review {
	r := &rng{x: seed}
	out := make([]review, n)
	for i := range out {
		label := r.intn(2)
		var words []string
		for range 8 + r.intn(17) {
			switch p := r.float(); {
			case p < 0.25 && label == 1, p >= 0.25 && p < 0.32 && label == 0:
				words = append(words, r.pick(positive))
			case p < 0.32:
				words = append(words, r.pick(negative))
			default:
				words = append(words, r.pick(neutral))
			}
		}
		out[i] = review{words, label}
	}
	return out
}

func feature(word string) int {
	h := fnv.New32a()
	h.Write([]byte(word))
	return int(h.Sum32() % dims)
}

type model struct {
	w    []float64
	bias float64
}

func (m *model) score(words []string) float64 {
	z := m.bias
	for _, w := range words {
		z += m.w[feature(w)]
	}
	return 1 / (1 + math.Exp(-z))
}

// train fits the weights by stochastic gradient descent.
func train(data []review, epochs int, lr float64) *model {
	m := &model{w: make([]float64, dims)}
	for range epochs {
		for _, d := range data {
			g := float64(d.label) - m.score(d.words)
			for _, w := range d.words {
				m.w[feature(w)] += lr * g
			}
			m.bias += lr * g
		}
	}
	return m
}

type server struct {
	m      *model
	inputs [3][]review
}

func newServer() *server {
	s := &server{m: train(dataset(7, 4000), 5, 0.05)}
	for i, b := range batches {
		s.inputs[i] = dataset(b.seed, b.n)
	}
	return s
}

func (s *server) handle(_ context.Context, payload string) (string, error) {
	set := map[string]int{"record": 1, "replay": 2}[payload]
	h := sha256.New()
	pos := 0
	for _, r := range s.inputs[set] {
		p := s.m.score(r.words)
		if p >= 0.5 {
			pos++
		}
		fmt.Fprintf(h, "%.4f,", p)
	}
	n := len(s.inputs[set])
	return fmt.Sprintf("lr-serving set=%d reviews=%d positive=%d negative=%d scores=%x", set, n, pos, n-pos, h.Sum(nil)[:8]), nil
}

func main() { sdk.Run(newServer().handle) }
