// Command image-rotate is the Go twin of functions/python/image-rotate:
// it decodes a JPEG and rotates it by 90, 180 and 270 degrees, re-encoding
// each result as JPEG (image/jpeg), so the same work runs on gVisor, runc
// and wasm.
//
// The three input images are drawn and JPEG-encoded at start-up: 320x240
// by default, 1024x768 for "record", 640x480 for "replay". The reply is
// "image-rotate set=<n> rotated <w>x<h> by 90/180/270, <k> JPEG bytes,
// pixels sha256=<16 hex>", the same in every instance.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/jpeg"
	"log/slog"
	"os"

	"vhive.dev/vhive/functions/sdk"
)

var sizes = [3][2]int{{320, 240}, {1024, 768}, {640, 480}}

type rotator struct {
	inputs [3][]byte // JPEG
}

func newRotator() (*rotator, error) {
	var r rotator
	for s, wh := range sizes {
		var buf bytes.Buffer
		if err := jpeg.Encode(&buf, drawInput(s, wh[0], wh[1]), &jpeg.Options{Quality: 90}); err != nil {
			return nil, fmt.Errorf("image-rotate: encode input %d: %w", s, err)
		}
		r.inputs[s] = buf.Bytes()
	}
	return &r, nil
}

// drawInput is a gradient with rectangles and rings, different per set.
func drawInput(s, w, h int) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.SetRGBA(x, y, color.RGBA{uint8(x * 255 / w), uint8(y * 255 / h), uint8((x + y) * 7), 255})
		}
	}
	for i := range 12 {
		x0, y0 := (i*97+s*31)%w, (i*61+s*17)%h
		for y := y0; y < min(y0+h/10, h); y++ {
			for x := max(w-x0-w/8, 0); x < w-x0; x++ {
				img.SetRGBA(x, y, color.RGBA{uint8(i * 20), 40, 200, 255})
			}
		}
		cx, cy, rad := x0+w/12, y0+h/12, min(w, h)/12
		for y := max(cy-rad, 0); y < min(cy+rad, h); y++ {
			for x := max(cx-rad, 0); x < min(cx+rad, w); x++ {
				if d := (x-cx)*(x-cx) + (y-cy)*(y-cy); d <= rad*rad && d >= (rad-3)*(rad-3) {
					img.SetRGBA(x, y, color.RGBA{255, 255, 255, 255})
				}
			}
		}
	}
	return img
}

// rotate returns src rotated counter-clockwise by quarter*90 degrees.
func rotate(src *image.RGBA, quarter int) *image.RGBA {
	b := src.Bounds()
	w, h := b.Dx(), b.Dy()
	dw, dh := w, h
	if quarter%2 == 1 {
		dw, dh = h, w
	}
	dst := image.NewRGBA(image.Rect(0, 0, dw, dh))
	for y := range h {
		row := src.Pix[y*src.Stride:]
		for x := range w {
			var dx, dy int
			switch quarter {
			case 1:
				dx, dy = y, w-1-x
			case 2:
				dx, dy = w-1-x, h-1-y
			case 3:
				dx, dy = h-1-y, x
			default:
				dx, dy = x, y
			}
			copy(dst.Pix[dy*dst.Stride+4*dx:dy*dst.Stride+4*dx+4], row[4*x:4*x+4])
		}
	}
	return dst
}

func (r *rotator) handle(_ context.Context, payload string) (string, error) {
	set := map[string]int{"record": 1, "replay": 2}[payload]
	dec, err := jpeg.Decode(bytes.NewReader(r.inputs[set]))
	if err != nil {
		return "", fmt.Errorf("image-rotate: decode: %w", err)
	}
	img := image.NewRGBA(dec.Bounds())
	draw.Draw(img, img.Bounds(), dec, dec.Bounds().Min, draw.Src)
	sum := sha256.New()
	encoded := 0
	for q := 1; q <= 3; q++ {
		rot := rotate(img, q)
		sum.Write(rot.Pix)
		var buf bytes.Buffer
		if err := jpeg.Encode(&buf, rot, &jpeg.Options{Quality: 85}); err != nil {
			return "", fmt.Errorf("image-rotate: encode: %w", err)
		}
		encoded += buf.Len()
	}
	b := img.Bounds()
	return fmt.Sprintf("image-rotate set=%d rotated %dx%d by 90/180/270, %d JPEG bytes, pixels sha256=%x",
		set, b.Dx(), b.Dy(), encoded, sum.Sum(nil)[:8]), nil
}

func mustNew() *rotator {
	r, err := newRotator()
	if err != nil {
		slog.Error("start-up failed", "err", err)
		os.Exit(1)
	}
	return r
}

func main() { sdk.Run(mustNew().handle) }
