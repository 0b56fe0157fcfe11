// Command ociimage writes an OCI image archive (an OCI image layout in a tar file, as
// `podman load` and `docker load` read) from files of the build host, with no container
// engine: one layer holding the given files at the given paths, and the image config's
// entrypoint, user, labels and environment. Image assembly is go-containerregistry's
// (mutate, layout); this program only lists what goes in.
//
// Usage:
//
//	ociimage -o out.tar -ref ghcr.io/gpu-dra/gpu-dra:0.1.0 -entrypoint /usr/bin/gpu-dra \
//	  -user 0:0 -label org.opencontainers.image.version=0.1.0 \
//	  -file target/release/gpu-dra=/usr/bin/gpu-dra -file /lib/x86_64-linux-gnu/libc.so.6
//
// A -file without "=" keeps the host path. Symbolic links are followed (the image holds
// the file's contents at the listed path). Timestamps are the Unix epoch and owners root,
// so the same inputs give the same archive.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

var epoch = time.Unix(0, 0).UTC()

func main() {
	var files, labels, env list
	out := flag.String("o", "", "output archive path")
	ref := flag.String("ref", "", "image reference recorded in the archive's index")
	entrypoint := flag.String("entrypoint", "", "entrypoint executable path in the image")
	user := flag.String("user", "0:0", "user[:group] the image runs as")
	flag.Var(&files, "file", "HOST[=IMAGE] file to add (repeatable)")
	flag.Var(&labels, "label", "KEY=VALUE image label (repeatable)")
	flag.Var(&env, "env", "KEY=VALUE environment variable (repeatable)")
	flag.Parse()
	if *out == "" || *ref == "" || *entrypoint == "" || len(files) == 0 {
		fmt.Fprintln(os.Stderr, "ociimage: -o, -ref, -entrypoint and at least one -file are required")
		os.Exit(2)
	}
	if err := run(*out, *ref, *entrypoint, *user, files, labels, env); err != nil {
		fmt.Fprintf(os.Stderr, "ociimage: %v\n", err)
		os.Exit(1)
	}
}

func run(out, ref, entrypoint, user string, files, labels, env list) error {
	layerTar, err := layerTarball(files)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: epoch}, CreatedBy: "ociimage", Comment: "files of " + ref,
	}})
	if err != nil {
		return fmt.Errorf("appending the layer: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS = "linux"
	cfg.Architecture = runtime.GOARCH
	cfg.Created = v1.Time{Time: epoch}
	cfg.Config.Entrypoint = []string{entrypoint}
	cfg.Config.User = user
	cfg.Config.WorkingDir = "/"
	cfg.Config.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	cfg.Config.Labels = map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("label %q: want KEY=VALUE", l)
		}
		cfg.Config.Labels[k] = v
	}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return fmt.Errorf("image config: %w", err)
	}

	dir, err := os.MkdirTemp(filepath.Dir(out), ".ociimage-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("OCI layout: %w", err)
	}
	annotations := map[string]string{
		"org.opencontainers.image.ref.name": ref,
		"io.containerd.image.name":          ref,
	}
	if err := p.AppendImage(img, layout.WithAnnotations(annotations)); err != nil {
		return fmt.Errorf("OCI layout: %w", err)
	}
	return tarDir(dir, out)
}

// layerTarball builds the layer: every listed file plus its parent directories.
func layerTarball(files list) ([]byte, error) {
	type entry struct{ host, image string }
	var entries []entry
	dirs := map[string]bool{}
	for _, f := range files {
		host, image, ok := strings.Cut(f, "=")
		if !ok {
			image = host
		}
		if !path.IsAbs(image) {
			return nil, fmt.Errorf("file %q: image path must be absolute", f)
		}
		image = path.Clean(image)
		entries = append(entries, entry{host, image})
		for d := path.Dir(image); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].image < entries[j].image })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var dirList []string
	for d := range dirs {
		dirList = append(dirList, d)
	}
	sort.Strings(dirList)
	for _, d := range dirList {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/",
			Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	for _, e := range entries {
		data, err := os.ReadFile(e.host)
		if err != nil {
			return nil, err
		}
		info, err := os.Stat(e.host)
		if err != nil {
			return nil, err
		}
		mode := int64(info.Mode().Perm())
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(e.image, "/"),
			Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// tarDir writes the OCI layout directory dir as the archive out (temp file, renamed).
func tarDir(dir, out string) error {
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if d.IsDir() {
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, ModTime: epoch})
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err = tw.Write(data)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}
