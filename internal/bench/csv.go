package bench

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"

	"vhive.dev/vhive/internal/bench/stats"
)

// Sample is the stage breakdown of one measured invocation, in µs, keyed
// by stage name (GetImage, CreateSandbox, ..., FuncInvocation).
type Sample map[string]float64

// Total is the sum of all stages, as vHive's Metric.Total.
func (s Sample) Total() float64 {
	var sum float64
	for _, v := range s {
		sum += v
	}
	return sum
}

// MeanStdHeader returns the vHive PrintMeanStd header for the given stages:
// FuncName, then for each stage in sorted order the stage and StdDev, then
// Total and StdDev.
func MeanStdHeader(stages []string) []string {
	keys := slices.Clone(stages)
	slices.Sort(keys)
	h := []string{"FuncName"}
	for _, k := range keys {
		h = append(h, k, "StdDev")
	}
	return append(h, "Total", "StdDev")
}

// stageUnion returns the sorted names of every stage present in samples.
func stageUnion(samples []Sample) []string {
	var keys []string
	for _, s := range samples {
		for k := range s {
			if !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
		}
	}
	slices.Sort(keys)
	return keys
}

// MeanStdRow computes one PrintMeanStd row: per stage (sorted) the mean as
// a truncated integer and the sample standard deviation with one decimal,
// then the same for the per-sample Total. A stage missing from a sample
// counts as 0 in that sample.
func MeanStdRow(funcName string, samples []Sample) (header, row []string) {
	keys := stageUnion(samples)
	header = MeanStdHeader(keys)
	row = []string{funcName}
	add := func(xs []float64) {
		row = append(row, strconv.Itoa(int(stats.Mean(xs))), fmt.Sprintf("%.1f", stats.StdDev(xs)))
	}
	for _, k := range keys {
		xs := make([]float64, len(samples))
		for i, s := range samples {
			xs[i] = s[k]
		}
		add(xs)
	}
	totals := make([]float64, len(samples))
	for i, s := range samples {
		totals[i] = s.Total()
	}
	add(totals)
	return header, row
}

// ErrHeaderMismatch is returned when appending to a CSV file whose header
// is not the one the new rows need.
var ErrHeaderMismatch = errors.New("existing CSV header differs")

// AppendCSV appends rows to the CSV file at path, writing header first only
// when the file is empty (vHive's behaviour). If the file already has a
// different header the rows are not written and the error wraps
// ErrHeaderMismatch, naming the file: columns would silently misalign.
func AppendCSV(path string, header []string, rows ...[]string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open results file %q: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat results file %q: %w", path, err)
	}
	w := csv.NewWriter(f)
	if fi.Size() == 0 {
		if err := w.Write(header); err != nil {
			return fmt.Errorf("write header to %q: %w", path, err)
		}
	} else {
		old, err := csv.NewReader(io.NewSectionReader(f, 0, fi.Size())).Read()
		if err != nil {
			return fmt.Errorf("read header of %q: %w", path, err)
		}
		if !slices.Equal(old, header) {
			return fmt.Errorf("%w in %q: has %v, new rows need %v (use another --out directory)", ErrHeaderMismatch, path, old, header)
		}
	}
	if err := w.WriteAll(rows); err != nil {
		return fmt.Errorf("append to %q: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %q: %w", path, err)
	}
	return nil
}

// WriteMeanStd appends the PrintMeanStd row of samples for funcName to the
// CSV at path (header only when the file is empty).
func WriteMeanStd(path, funcName string, samples []Sample) error {
	if len(samples) == 0 {
		return fmt.Errorf("no samples for %q: nothing to write to %q", funcName, path)
	}
	h, row := MeanStdRow(funcName, samples)
	return AppendCSV(path, h, row)
}

// PageStatsHeader is vHive's page statistics CSV header.
func PageStatsHeader() []string {
	return []string{"FuncName", "RecPages", "RecRegions", "Unique", "StdDev"}
}

// WritePageStats appends one page statistics row: the pages and regions the
// record run captured in the working set, and the mean and sample standard
// deviation of the unique (not prefetched) page faults over the measured
// prefetch runs.
func WritePageStats(path, funcName string, recPages, recRegions int64, unique []float64) error {
	row := []string{
		funcName,
		strconv.FormatInt(recPages, 10),
		strconv.FormatInt(recRegions, 10),
		strconv.Itoa(int(stats.Mean(unique))),
		fmt.Sprintf("%.1f", stats.StdDev(unique)),
	}
	return AppendCSV(path, PageStatsHeader(), row)
}

// WriteCSV writes header and rows to path, replacing the file.
func WriteCSV(path string, header []string, rows [][]string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %q: %w", path, err)
	}
	defer f.Close()
	w := csv.NewWriter(f)
	if err := w.Write(header); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if err := w.WriteAll(rows); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %q: %w", path, err)
	}
	return nil
}
