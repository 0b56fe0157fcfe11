package main

import (
	"fmt"
	"sort"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	v1 "k8s.io/api/core/v1"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

// resolveCDI does what containerd/CRI-O do with the CDI ids a kubelet passes
// in the CRI request: load the CDI specs from the node's spec dir with the
// upstream CDI library and inject the devices into an OCI spec that starts
// from the container's literal env.
func resolveCDI(cdiDir string, c *v1.Container, ids []string) (*containerResult, error) {
	spec := &oci.Spec{Version: oci.Version, Process: &oci.Process{}, Linux: &oci.Linux{}}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			spec.Process.Env = append(spec.Process.Env, e.Name+"="+e.Value)
		}
	}
	if len(ids) > 0 {
		cache, err := cdi.NewCache(cdi.WithSpecDirs(cdiDir), cdi.WithAutoRefresh(false))
		if err != nil {
			return nil, fmt.Errorf("CDI cache for %s: %w", cdiDir, err)
		}
		// Refresh reports broken spec files; they only matter if one of our ids is
		// affected, which InjectDevices reports as unresolvable.
		refreshErr := cache.Refresh()
		if _, err := cache.InjectDevices(spec, ids...); err != nil {
			if refreshErr != nil {
				return nil, fmt.Errorf("CDI (spec dir %s): %w (spec errors: %v)", cdiDir, err, refreshErr)
			}
			return nil, fmt.Errorf("CDI (spec dir %s): %w", cdiDir, err)
		}
	}
	r := &containerResult{
		Container:   c.Name,
		CDIDevices:  append([]string{}, ids...),
		Env:         append([]string{}, spec.Process.Env...),
		DeviceNodes: []deviceNode{},
		Mounts:      []mountSummary{},
	}
	sort.Strings(r.CDIDevices)
	for _, d := range spec.Linux.Devices {
		r.DeviceNodes = append(r.DeviceNodes, deviceNode{Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor})
	}
	for _, m := range spec.Mounts {
		r.Mounts = append(r.Mounts, mountSummary{Destination: m.Destination, Source: m.Source, Type: m.Type, Options: m.Options})
	}
	if spec.Hooks != nil {
		r.Hooks = spec.Hooks
	}
	return r, nil
}
