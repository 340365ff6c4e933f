package main

import (
	"image"
	"image/color"
	"strings"
	"testing"

	"vhive.dev/vhive/functions/sdk"
	"vhive.dev/vhive/functions/sdk/sdktest"
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
	out := sdktest.InputSets(t, func() sdk.Handler { return mustNew().handle })
	if !strings.HasPrefix(out[1], "image-rotate set=1 rotated 1024x768 ") {
		t.Errorf("record = %q", out[1])
	}
}
