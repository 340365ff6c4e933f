package bench

import (
	"fmt"

	"math"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// Bar is one stacked bar: mean stage times in µs.
type Bar struct {
	Label  string
	Stages Sample
}

// Series is one line of a line plot.
type Series struct {
	Name string
	X, Y []float64
}

func save(p *plot.Plot, w, h vg.Length, base string) ([]string, error) {
	var out []string
	for _, ext := range []string{"png", "svg"} {
		path := base + "." + ext
		if err := p.Save(w, h, path); err != nil {
			return out, fmt.Errorf("save plot %q: %w", path, err)
		}
		out = append(out, path)
	}
	return out, nil
}

// PlotBreakdown draws a stacked bar per Bar, one colour per stage, in
// milliseconds, and saves it as base.png and base.svg.
func PlotBreakdown(base, title string, bars []Bar) ([]string, error) {
	if len(bars) == 0 {
		return nil, fmt.Errorf("plot %q: no bars", base)
	}
	samples := make([]Sample, len(bars))
	labels := make([]string, len(bars))
	for i, b := range bars {
		samples[i] = b.Stages
		labels[i] = b.Label
	}
	stages := stageUnion(samples)
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = "latency (ms)"
	// Legend top right, above the bars: leave headroom for it.
	p.Legend.Top = true
	var tallest float64
	for _, s := range samples {
		tallest = max(tallest, s.Total()/1000)
	}
	p.Y.Min = 0
	p.Y.Max = tallest * (1 + 0.08*float64(len(stages)))
	width := vg.Points(28)
	var below *plotter.BarChart
	for i, st := range stages {
		vals := make(plotter.Values, len(bars))
		for j, s := range samples {
			vals[j] = s[st] / 1000
		}
		bc, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return nil, fmt.Errorf("plot %q stage %q: %w", base, st, err)
		}
		bc.Color = plotutil.Color(i)
		bc.LineStyle.Width = vg.Length(0)
		if below != nil {
			bc.StackOn(below)
		}
		below = bc
		p.Add(bc)
		p.Legend.Add(st, bc)
	}
	p.NominalX(labels...)
	p.X.Tick.Label.Rotation = math.Pi / 6
	p.X.Tick.Label.XAlign = draw.XRight
	p.Add(plotter.NewGrid())
	w := max(6*vg.Inch, vg.Length(len(bars))*0.7*vg.Inch)
	return save(p, w, 4.5*vg.Inch, base)
}

// PlotLines draws each Series as a line with points and saves base.png and
// base.svg. With logX the x axis is log2-scaled and ticked at the x values
// of the first series (e.g. concurrency levels 1, 2, 4, ...).
func PlotLines(base, title, xLabel, yLabel string, series []Series, logX bool) ([]string, error) {
	if len(series) == 0 {
		return nil, fmt.Errorf("plot %q: no series", base)
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	var ticks []plot.Tick
	for i, s := range series {
		if len(s.X) != len(s.Y) || len(s.X) == 0 {
			return nil, fmt.Errorf("plot %q series %q: %d x values, %d y values", base, s.Name, len(s.X), len(s.Y))
		}
		pts := make(plotter.XYs, len(s.X))
		for j := range s.X {
			if logX && s.X[j] <= 0 {
				return nil, fmt.Errorf("plot %q series %q: x=%v on a log axis", base, s.Name, s.X[j])
			}
			pts[j].X, pts[j].Y = s.X[j], s.Y[j]
			if i == 0 {
				ticks = append(ticks, plot.Tick{Value: s.X[j], Label: strconv.FormatFloat(s.X[j], 'g', -1, 64)})
			}
		}
		l, sc, err := plotter.NewLinePoints(pts)
		if err != nil {
			return nil, fmt.Errorf("plot %q series %q: %w", base, s.Name, err)
		}
		l.Color = plotutil.Color(i)
		l.Dashes = plotutil.Dashes(i)
		sc.Color = plotutil.Color(i)
		sc.Shape = plotutil.Shape(i)
		p.Add(l, sc)
		p.Legend.Add(s.Name, l, sc)
	}
	if logX {
		// The axis is padded around the points: with a single x value
		// gonum would widen [x, x] to [x-1, x+1], which a log scale
		// cannot take when x <= 1 (one concurrency level).
		p.X.Min, p.X.Max = ticks[0].Value, ticks[0].Value
		for _, t := range ticks {
			p.X.Min, p.X.Max = min(p.X.Min, t.Value), max(p.X.Max, t.Value)
		}
		p.X.Min, p.X.Max = p.X.Min/1.25, p.X.Max*1.25
		p.X.Scale = plot.LogScale{}
		slices.SortFunc(ticks, func(a, b plot.Tick) int {
			switch {
			case a.Value < b.Value:
				return -1
			case a.Value > b.Value:
				return 1
			}
			return 0
		})
		p.X.Tick.Marker = plot.ConstantTicks(ticks)
	}
	p.Y.Min = 0
	return save(p, 6*vg.Inch, 4*vg.Inch, base)
}

// WritePlots draws one stacked-bar breakdown per sandbox (function × mode
// bars of mean stage times; the REAP record run is its own bar) into dir as
// coldstart-<sandbox>.png/.svg.
func (r *ColdstartResult) WritePlots(dir string) ([]string, error) {
	bySandbox := map[string][]Bar{}
	var order []string
	for _, c := range r.Cells {
		if !c.OK() {
			continue
		}
		if !slices.Contains(order, c.Sandbox) {
			order = append(order, c.Sandbox)
		}
		if c.Record != nil {
			bySandbox[c.Sandbox] = append(bySandbox[c.Sandbox], Bar{Label: c.Function + " " + StartedREAPRecord, Stages: c.Record.Stages})
		}
		bySandbox[c.Sandbox] = append(bySandbox[c.Sandbox], Bar{Label: c.Function + " " + c.Mode, Stages: meanSample(c.Samples())})
	}
	var out []string
	for _, sb := range order {
		files, err := PlotBreakdown(dirJoin(dir, "coldstart-"+sb), "cold-start breakdown, "+sb+" (mean of "+strconv.Itoa(r.Iterations)+")", bySandbox[sb])
		out = append(out, files...)
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// meanSample is the per-stage mean of samples.
func meanSample(samples []Sample) Sample {
	m := Sample{}
	for _, k := range stageUnion(samples) {
		var sum float64
		for _, s := range samples {
			sum += s[k]
		}
		m[k] = sum / float64(len(samples))
	}
	return m
}
