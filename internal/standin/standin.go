// Package standin builds small stand-in container images from files given
// in full (typically the host's static busybox with its applets linked in)
// and pushes them to a registry: the images the CRI tests and critest pull,
// on a machine that cannot reach the real registries.
//
// Layers are uncompressed tars in the given order with the Unix epoch as
// every time, so the same files give the same digests.
package standin

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// File is one layer entry: a directory (Path ends in "/"), a symlink (Link
// set; mode 0777) or a regular file holding Body.
type File struct {
	Path string
	Mode int64
	Body string
	Link string
	UID  int
	GID  int
}

// Layer makes a layer of files, in order.
func Layer(files []File) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		if f.Path == "" {
			return nil, fmt.Errorf("layer entry with an empty path")
		}
		h := &tar.Header{Name: f.Path, Mode: f.Mode, Uid: f.UID, Gid: f.GID, ModTime: time.Unix(0, 0)}
		switch {
		case f.Link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.Link, 0o777
		case f.Path[len(f.Path)-1] == '/':
			h.Typeflag = tar.TypeDir
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, f.Body); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// Image is one stand-in image: the base layer, then Files as a second layer
// if there are any, for linux/amd64.
type Image struct {
	// Repos are the repository:tag names it is pushed as, without the
	// registry host.
	Repos      []string
	Files      []File
	Entrypoint []string
	Cmd        []string
	User       string
	Env        []string
	Ports      []string // exposed, e.g. "80/tcp"
}

// Push builds every image on base and pushes it, under each of its names,
// to the plain-HTTP registry at addr (host:port).
func Push(ctx context.Context, addr string, base v1.Layer, images []Image) error {
	for _, s := range images {
		if len(s.Repos) == 0 {
			return fmt.Errorf("stand-in image with no name")
		}
		img, err := mutate.AppendLayers(empty.Image, base)
		if err != nil {
			return err
		}
		if len(s.Files) > 0 {
			l, err := Layer(s.Files)
			if err != nil {
				return fmt.Errorf("build layer for %s: %w", s.Repos[0], err)
			}
			if img, err = mutate.AppendLayers(img, l); err != nil {
				return err
			}
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		cf = cf.DeepCopy()
		cf.Architecture, cf.OS = "amd64", "linux"
		cf.Config.Entrypoint, cf.Config.Cmd, cf.Config.User, cf.Config.Env = s.Entrypoint, s.Cmd, s.User, s.Env
		if len(s.Ports) > 0 {
			cf.Config.ExposedPorts = map[string]struct{}{}
			for _, p := range s.Ports {
				cf.Config.ExposedPorts[p] = struct{}{}
			}
		}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			return err
		}
		for _, r := range s.Repos {
			ref, err := name.ParseReference(addr+"/"+r, name.Insecure)
			if err != nil {
				return fmt.Errorf("reference %q: %w", r, err)
			}
			if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
				return fmt.Errorf("push %s: %w", ref, err)
			}
		}
	}
	return nil
}
