package main

import (
	"context"
	"image"
	"image/color"
	"strings"
	"testing"
)

func TestRotate(t *testing.T) {
	src := image.NewRGBA(image.Rect(0, 0, 3, 2))
	src.SetRGBA(0, 0, color.RGBA{1, 0, 0, 255}) // top left
	src.SetRGBA(2, 1, color.RGBA{2, 0, 0, 255}) // bottom right
	r1 := rotate(src, 1)
	if r1.Bounds().Dx() != 2 || r1.Bounds().Dy() != 3 {
		t.Fatalf("90° of 3x2 is %v", r1.Bounds())
	}
	// Counter-clockwise: the top-left corner goes to the bottom left.
	if r1.RGBAAt(0, 2).R != 1 || r1.RGBAAt(1, 0).R != 2 {
		t.Errorf("90° rotation misplaces pixels: %v", r1.Pix)
	}
	back := rotate(rotate(rotate(r1, 1), 1), 1)
	for i := range src.Pix {
		if back.Pix[i] != src.Pix[i] {
			t.Fatal("four quarter turns do not give the image back")
		}
	}
	if r2 := rotate(src, 2); r2.RGBAAt(2, 1).R != 1 || r2.RGBAAt(0, 0).R != 2 {
		t.Error("180° rotation misplaces pixels")
	}
}

func TestHandle(t *testing.T) {
	a, b := mustNew(), mustNew()
	seen := map[string]bool{}
	for _, p := range []string{"x", "record", "replay"} {
		ra, err := a.handle(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		rb, _ := b.handle(context.Background(), p)
		if ra != rb {
			t.Errorf("%s: %q vs %q across instances", p, ra, rb)
		}
		seen[ra] = true
		t.Log(ra)
	}
	if len(seen) != 3 {
		t.Error("input sets do not differ")
	}
	if r, _ := a.handle(context.Background(), "record"); !strings.HasPrefix(r, "image-rotate set=1 rotated 1024x768 ") {
		t.Errorf("record = %q", r)
	}
}
