// Command report compares critest runs: it reads Ginkgo JSON reports
// (critest --ginkgo.json-report), one per runtime, and prints a Markdown
// summary (passed/failed/skipped per runtime) and a table of every spec that
// did not pass everywhere, with the first line of each failure.
//
//	report containerd=containerd.json vhive=vhive.json
//
// It exits 1 when a runtime named after the first fails a spec that the
// first (the baseline) passes: vhive must pass every spec that stock
// containerd passes.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

type specReport struct {
	ContainerHierarchyTexts []string `json:"ContainerHierarchyTexts"`
	LeafNodeText            string   `json:"LeafNodeText"`
	LeafNodeType            string   `json:"LeafNodeType"`
	State                   string   `json:"State"`
	Failure                 struct {
		Message string `json:"Message"`
	} `json:"Failure"`
}

type suiteReport struct {
	SpecReports []specReport `json:"SpecReports"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

type result struct {
	state string
	msg   string
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: report name=report.json [name=report.json]")
	}
	var names []string
	results := map[string]map[string]result{} // spec → runtime → result
	for _, a := range args {
		name, path, ok := strings.Cut(a, "=")
		if !ok {
			return fmt.Errorf("argument %q: want name=report.json", a)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var suites []suiteReport
		if err := json.Unmarshal(b, &suites); err != nil {
			return fmt.Errorf("decode %q: %w", path, err)
		}
		names = append(names, name)
		for _, s := range suites {
			for _, r := range s.SpecReports {
				if r.LeafNodeType != "It" {
					continue
				}
				spec := strings.Join(append(r.ContainerHierarchyTexts, r.LeafNodeText), " ")
				if results[spec] == nil {
					results[spec] = map[string]result{}
				}
				msg, _, _ := strings.Cut(strings.TrimSpace(r.Failure.Message), "\n")
				results[spec][name] = result{state: r.State, msg: msg}
			}
		}
	}
	fmt.Println("| runtime | passed | failed | skipped |")
	fmt.Println("|---|---|---|---|")
	for _, n := range names {
		var p, f, s int
		for _, rs := range results {
			switch rs[n].state {
			case "passed":
				p++
			case "skipped", "pending", "":
				s++
			default:
				f++
			}
		}
		fmt.Printf("| %s | %d | %d | %d |\n", n, p, f, s)
	}
	var specs []string
	for spec, rs := range results {
		for _, n := range names {
			if st := rs[n].state; st != "passed" && st != "skipped" {
				specs = append(specs, spec)
				break
			}
		}
	}
	sort.Strings(specs)
	fmt.Println()
	fmt.Printf("| spec | %s |\n", strings.Join(names, " | "))
	fmt.Printf("|---%s|\n", strings.Repeat("|---", len(names)))
	for _, spec := range specs {
		cells := make([]string, len(names))
		for i, n := range names {
			r := results[spec][n]
			cell := r.state
			if r.msg != "" && r.state != "passed" {
				m := r.msg
				if len(m) > 140 {
					m = m[:140] + "…"
				}
				cell += ": " + m
			}
			cells[i] = strings.ReplaceAll(cell, "|", "\\|")
		}
		fmt.Printf("| %s | %s |\n", strings.ReplaceAll(spec, "|", "\\|"), strings.Join(cells, " | "))
	}
	var regressions []string
	for spec, rs := range results {
		if rs[names[0]].state != "passed" {
			continue
		}
		for _, n := range names[1:] {
			if rs[n].state != "passed" {
				regressions = append(regressions, fmt.Sprintf("%s: %s %s, %s passed", spec, n, rs[n].state, names[0]))
			}
		}
	}
	if len(regressions) > 0 {
		sort.Strings(regressions)
		return fmt.Errorf("%d spec(s) pass on %s but not everywhere:\n  %s", len(regressions), names[0], strings.Join(regressions, "\n  "))
	}
	fmt.Printf("\nevery spec that passes on %s passes on %s\n", names[0], strings.Join(names[1:], ", "))
	return nil
}
