// Command mkimage builds the example functions and packages them as OCI
// images without Docker (see vhive.dev/vhive/functions/build), and the
// Python function suite from Debian packages with mmdebstrap (see
// vhive.dev/vhive/internal/debimage; needs root and mmdebstrap):
//
//	go run ./tools/mkimage -function helloworld -target both -format both -out out/images
//	go run ./tools/mkimage -all
//	go run ./tools/mkimage -python ci            # the CI set of functions/python
//	go run ./tools/mkimage -python full          # every Python function
//	go run ./tools/mkimage -python lr-serving,pyaes
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/debimage"
)

type config struct {
	function string
	all      bool
	target   string
	format   string
	out      string
	python   string
	suiteDir string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var c config
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.function, "function", "", "function to build (a directory under functions/)")
	fs.BoolVar(&c.all, "all", false, "build every example function")
	fs.StringVar(&c.target, "target", "both", "linux, wasm or both")
	fs.StringVar(&c.format, "format", "both", "layout (OCI layout dir), tar (docker-archive) or both")
	fs.StringVar(&c.out, "out", "out/images", "output directory")
	fs.StringVar(&c.python, "python", "", "build Python functions from Debian packages instead: ci (the CI set), full (all) or NAME[,NAME...]")
	fs.StringVar(&c.suiteDir, "python-dir", "functions/python", "directory of the Python functions (-python)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.python != "" {
		if c.all || c.function != "" {
			return errors.New("-python builds the Python suite; give it without -function or -all")
		}
		return runPython(ctx, c, stdout)
	}
	functions, err := selectFunctions(c)
	if err != nil {
		return err
	}
	targets, err := parseTargets(c.target)
	if err != nil {
		return err
	}
	formats, err := parseFormats(c.format)
	if err != nil {
		return err
	}
	for _, f := range functions {
		ts := targets
		if slices.Contains(build.ServerNames(), f) {
			ts = []build.Target{build.TargetLinux} // their own servers: Linux only
		}
		imgs, err := build.BuildFunction(ctx, build.Options{
			Function: f, Targets: ts, Formats: formats, OutDir: c.out,
		})
		if err != nil {
			return err
		}
		for _, img := range imgs {
			fmt.Fprintf(stdout, "%s %s", img.Ref, img.Digest)
			if img.Layout != "" {
				fmt.Fprintf(stdout, " layout=%s", img.Layout)
			}
			if img.Tarball != "" {
				fmt.Fprintf(stdout, " tar=%s", img.Tarball)
			}
			fmt.Fprintln(stdout)
		}
	}
	return nil
}

func selectFunctions(c config) ([]string, error) {
	switch {
	case c.all && c.function != "":
		return nil, errors.New("give -function NAME or -all, not both")
	case c.all:
		return append(build.Names(), build.ServerNames()...), nil
	case c.function == "":
		return nil, errors.New("give -function NAME or -all")
	}
	return []string{c.function}, nil
}

func parseTargets(s string) ([]build.Target, error) {
	switch s {
	case "linux":
		return []build.Target{build.TargetLinux}, nil
	case "wasm":
		return []build.Target{build.TargetWasm}, nil
	case "both":
		return []build.Target{build.TargetLinux, build.TargetWasm}, nil
	}
	return nil, fmt.Errorf("-target %q: want linux, wasm or both", s)
}

func parseFormats(s string) ([]build.Format, error) {
	switch s {
	case "layout":
		return []build.Format{build.FormatLayout}, nil
	case "tar":
		return []build.Format{build.FormatTar}, nil
	case "both":
		return []build.Format{build.FormatLayout, build.FormatTar}, nil
	}
	return nil, fmt.Errorf("-format %q: want layout, tar or both", s)
}

// runPython builds the Python functions c.python selects.
func runPython(ctx context.Context, c config, stdout io.Writer) error {
	var dirs []string
	switch c.python {
	case "ci", "full":
		all, err := debimage.Functions(c.suiteDir, c.python == "full")
		if err != nil {
			return fmt.Errorf("-python %s: %w", c.python, err)
		}
		dirs = all
	default:
		for _, n := range strings.Split(c.python, ",") {
			dirs = append(dirs, filepath.Join(c.suiteDir, strings.TrimSpace(n)))
		}
	}
	formats, err := parseFormats(c.format)
	if err != nil {
		return err
	}
	for _, d := range dirs {
		start := time.Now()
		img, err := debimage.Build(ctx, debimage.Options{Dir: d, OutDir: c.out, Runtime: filepath.Join(c.suiteDir, "runtime"), Formats: formats})
		if err != nil {
			return err
		}
		base := "built"
		if img.BaseCached {
			base = "cached"
		}
		fmt.Fprintf(stdout, "%s %s layout=%s tar=%s base=%s (%s) %.1fs\n", img.Ref, img.Digest, img.Layout, img.Tarball,
			img.BaseKey, base, time.Since(start).Seconds())
	}
	return nil
}
