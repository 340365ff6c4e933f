package invoker

import (
	"bufio"
	"encoding/csv"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
)

// LatencyFileName is where vSwarm's invoker writes its latencies for a
// -latf of latf: "rps<real rps with 2 decimals>_<base of latf>" in latf's
// directory (e.g. rps9.98_lat.csv).
func LatencyFileName(latf string, realRPS float64) string {
	return filepath.Join(filepath.Dir(latf), fmt.Sprintf("rps%.2f_%s", realRPS, filepath.Base(latf)))
}

// WriteLatencies writes the latencies of the measured, successful requests
// in vSwarm's format: one integer number of microseconds per line, in
// issue order.
func (r *Result) WriteLatencies(w io.Writer) error {
	bw := bufio.NewWriter(w)
	for _, rec := range r.Records {
		if rec.Warmup || rec.Code != codes.OK {
			continue
		}
		if _, err := bw.WriteString(strconv.FormatInt(rec.Latency.Microseconds(), 10) + "\n"); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// WriteLatencyFile writes WriteLatencies to path.
func (r *Result) WriteLatencyFile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create latency file: %w", err)
	}
	defer f.Close()
	if err := r.WriteLatencies(f); err != nil {
		return fmt.Errorf("write latency file %q: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close latency file %q: %w", path, err)
	}
	return nil
}

// recordsHeader is the header of the per-request CSV.
func recordsHeader() []string {
	return []string{"Seq", "Endpoint", "StartUnixNano", "LatencyMicros", "Code", "ColdStart", "Warmup", "ScheduledUnixNano", "Error"}
}

// WriteRecordsCSV writes one row per request, warm-up and failures
// included: issue timestamp (Unix ns), latency (µs), gRPC code name,
// cold start and warm-up flags, scheduled issue time (Unix ns), error text.
func (r *Result) WriteRecordsCSV(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create records CSV: %w", err)
	}
	defer f.Close()
	w := csv.NewWriter(f)
	if err := w.Write(recordsHeader()); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	for _, rec := range r.Records {
		row := []string{
			strconv.Itoa(rec.Seq), rec.Endpoint, strconv.FormatInt(rec.Start.UnixNano(), 10),
			strconv.FormatInt(rec.Latency.Microseconds(), 10), rec.Code.String(),
			strconv.FormatBool(rec.Cold), strconv.FormatBool(rec.Warmup), strconv.FormatInt(rec.Scheduled.UnixNano(), 10), rec.Error,
		}
		if err := w.Write(row); err != nil {
			return fmt.Errorf("write %q: %w", path, err)
		}
	}
	w.Flush()
	if err := w.Error(); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %q: %w", path, err)
	}
	return nil
}

func usDur(us float64) string {
	return (time.Duration(us) * time.Microsecond).Round(10 * time.Microsecond).String()
}

// WriteReport prints the summary for a terminal.
func (s Summary) WriteReport(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Issued / completed requests:\t%d / %d\n", s.Issued, s.Completed)
	fmt.Fprintf(tw, "Real / target RPS:\t%.2f / %v\t(issued at %.2f RPS)\n", s.RealRPS, s.TargetRPS, s.IssuedRPS)
	if s.Warmup > 0 {
		fmt.Fprintf(tw, "Warm-up requests (excluded):\t%d\n", s.Warmup)
	}
	fmt.Fprintf(tw, "Cold starts:\t%d\n", s.ColdStart)
	fmt.Fprintf(tw, "Max issue lag behind schedule:\t%s\n", s.MaxIssueLag.Round(time.Microsecond))
	if s.Latency.N > 0 {
		l := s.Latency
		fmt.Fprintf(tw, "Latency p50 / p90 / p99 / p99.9 / max:\t%s / %s / %s / %s / %s\n",
			usDur(l.P50), usDur(l.P90), usDur(l.P99), usDur(l.P999), usDur(l.Max))
		fmt.Fprintf(tw, "Latency mean ± std:\t%s ± %s\n", usDur(l.Mean), usDur(l.StdDev))
	} else {
		fmt.Fprintf(tw, "Latency:\tno completed requests\n")
	}
	for _, code := range slices.Sorted(maps.Keys(s.Errors)) {
		fmt.Fprintf(tw, "Errors %s:\t%d\n", code, s.Errors[code])
	}
	return tw.Flush()
}

// WriteEndpointTable prints one line per endpoint: requests, errors, cold
// starts and latency percentiles of its measured requests.
func (r *Result) WriteEndpointTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Endpoint\tIssued\tOK\tErrors\tCold\tp50\tp99\tmax")
	for _, ep := range r.Endpoints() {
		s := r.ForEndpoint(ep).Summarize()
		p50, p99, mx := "-", "-", "-"
		if s.Latency.N > 0 {
			p50, p99, mx = usDur(s.Latency.P50), usDur(s.Latency.P99), usDur(s.Latency.Max)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", ep, s.Issued, s.Completed, s.Failed, s.ColdStart, p50, p99, mx)
	}
	return tw.Flush()
}
