// fleet-tsdb writes the history of a synthetic SLM fleet as Prometheus TSDB blocks, with Prometheus' own
// tsdb package at the version the project pins (scripts/deps/versions.env), for bench/bench_fleet_rules.py.
//
// `promtool tsdb create-blocks-from openmetrics` does the same from text, but three days of a thousand
// deployments are hundreds of millions of samples: tens of gigabytes of text and most of an hour of
// parsing, where appending them straight to a block takes a minute.
//
// Input (JSON on stdin): an epoch, the targets by scope (e.g. every pod with the labels its scrape gives
// it, every pod with the labels a recording rule keeps, every deployment), each with a rate scale, and the
// series of one target of a scope, each with how its value follows time and over which ranges it has
// samples. The bench's live exporter serves the very same functions of time, so the scraped samples
// continue the history without a counter reset.
//
//	fleet-tsdb <output directory> < spec.json
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"os"
	"sort"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb"
)

type sampleRange struct {
	FromMs int64 `json:"from_ms"`
	ToMs   int64 `json:"to_ms"`
	StepMs int64 `json:"step_ms"`
}

type series struct {
	Labels  map[string]string `json:"labels"`
	Scope   string            `json:"scope"` // the key in spec.Targets whose labels it gets
	Kind    string            `json:"kind"`  // "counter" (whole counts), "float_counter" or "gauge"
	Base    float64           `json:"base"`
	Rate    float64           `json:"rate"`     // per second, times the target's scale
	Amp     float64           `json:"amp"`      // gauges: amplitude of a sine around base
	Period  float64           `json:"period_s"` // gauges: its period
	Phase   float64           `json:"phase"`
	Ranges  []sampleRange     `json:"ranges"`
}

type target struct {
	Labels map[string]string `json:"labels"`
	Scale  float64           `json:"scale"`
}

type spec struct {
	EpochMs int64               `json:"epoch_ms"`
	BlockMs int64               `json:"block_ms"`
	Targets map[string][]target `json:"targets"`
	Series  []series            `json:"series"`
}

// value is the series' value at time t (ms) for a target of rate scale `scale`; the Python exporter
// (bench/bench_fleet_rules.py, `series_value`) computes the same.
func value(s *series, scale float64, epochMs, t int64) float64 {
	elapsed := float64(t-epochMs) / 1000
	switch s.Kind {
	case "counter":
		return math.Floor(s.Base + s.Rate*scale*elapsed)
	case "float_counter":
		return s.Base + s.Rate*scale*elapsed
	default:
		return s.Base + s.Amp*math.Sin(2*math.Pi*elapsed/s.Period+s.Phase)
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: fleet-tsdb <output directory> < spec.json")
		os.Exit(2)
	}
	var sp spec
	if err := json.NewDecoder(os.Stdin).Decode(&sp); err != nil {
		fmt.Fprintln(os.Stderr, "fleet-tsdb: reading the spec:", err)
		os.Exit(2)
	}
	if err := write(os.Args[1], &sp); err != nil {
		fmt.Fprintln(os.Stderr, "fleet-tsdb:", err)
		os.Exit(1)
	}
}

func write(dir string, sp *spec) error {
	if sp.BlockMs <= 0 {
		return fmt.Errorf("block_ms must be positive")
	}
	minT, maxT := int64(math.MaxInt64), int64(math.MinInt64)
	for _, s := range sp.Series {
		if _, ok := sp.Targets[s.Scope]; !ok {
			return fmt.Errorf("series %v: no targets of scope %q", s.Labels, s.Scope)
		}
		for _, r := range s.Ranges {
			if r.StepMs <= 0 || r.ToMs < r.FromMs {
				return fmt.Errorf("bad range %+v", r)
			}
			minT, maxT = min(minT, r.FromMs), max(maxT, r.ToMs)
		}
	}
	if minT > maxT {
		return fmt.Errorf("no samples to write")
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	total := 0
	// One block per aligned window, as promtool's backfill does: blocks must not overlap.
	for start := minT - minT%sp.BlockMs; start <= maxT; start += sp.BlockMs {
		end := start + sp.BlockMs // exclusive
		n, err := writeBlock(dir, sp, logger, start, end)
		if err != nil {
			return err
		}
		total += n
	}
	fmt.Printf("%d samples\n", total)
	return nil
}

func labelSet(extra, own map[string]string) labels.Labels {
	merged := make(map[string]string, len(extra)+len(own))
	for k, v := range extra {
		merged[k] = v
	}
	for k, v := range own {
		merged[k] = v
	}
	return labels.FromMap(merged)
}

func writeBlock(dir string, sp *spec, logger *slog.Logger, start, end int64) (int, error) {
	// The head accepts samples no older than half its chunk range before its newest one; series are
	// appended one after the other across the whole window, so the range is twice the window.
	w, err := tsdb.NewBlockWriter(logger, dir, 2*sp.BlockMs)
	if err != nil {
		return 0, err
	}
	defer w.Close()
	ctx := context.Background()
	app := w.Appender(ctx)
	pending, written := 0, 0
	for i := range sp.Series {
		s := &sp.Series[i]
		targets := sp.Targets[s.Scope]
		ranges := append([]sampleRange(nil), s.Ranges...)
		sort.Slice(ranges, func(a, b int) bool { return ranges[a].FromMs < ranges[b].FromMs })
		for _, tg := range targets {
			lset := labelSet(tg.Labels, s.Labels)
			var ref storage.SeriesRef
			last := int64(math.MinInt64)
			for _, r := range ranges {
				first := max(r.FromMs, start)
				// Samples on the range's own grid (FromMs + k*StepMs), from the window's start on.
				if off := (first - r.FromMs) % r.StepMs; off != 0 {
					first += r.StepMs - off
				}
				for t := first; t <= r.ToMs && t < end; t += r.StepMs {
					if t <= last {
						continue // ranges that overlap: keep time increasing
					}
					ref, err = app.Append(ref, lset, t, value(s, tg.Scale, sp.EpochMs, t))
					if err != nil {
						return 0, fmt.Errorf("append %s at %d: %w", lset, t, err)
					}
					last = t
					pending++
					if pending >= 1_000_000 {
						if err := app.Commit(); err != nil {
							return 0, err
						}
						written += pending
						pending = 0
						app = w.Appender(ctx)
					}
				}
			}
		}
	}
	if err := app.Commit(); err != nil {
		return 0, err
	}
	written += pending
	if written == 0 {
		return 0, nil
	}
	if _, err := w.Flush(ctx); err != nil {
		return 0, fmt.Errorf("flush block [%d, %d): %w", start, end, err)
	}
	return written, nil
}
