package main

// A fake cgroup v2 tree per node, so a driver that limits GPU memory per pod
// cgroup (NVML nvmlDeviceSetMemoryLimits_v1, nameSpace = the pod cgroup's
// directory) has a real directory to name. Like the kubelet, the agent creates
// the pod cgroup before the DRA manager's PrepareResources
// (pkg/kubelet/kubelet.go: pcm.EnsureExists runs in SyncPod before the
// container runtime is asked for anything) and removes it once the pod is
// terminated and its resources unprepared (the kubelet's cleanupOrphanedPodCgroups).
//
// Names follow the kubelet's pod container manager
// (pkg/kubelet/cm/pod_container_manager_linux.go GetPodContainerName,
// qos_container_manager_linux.go, cgroup_manager_linux.go ToCgroupfs/ToSystemd):
//
//	cgroupfs: kubepods/pod<uid>, kubepods/burstable/pod<uid>, kubepods/besteffort/pod<uid>
//	systemd:  kubepods.slice/kubepods-pod<uid_>.slice,
//	          kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice, ...
//
// (systemd escapes "-" in the UID as "_"). Every directory the agent creates
// gets the dmem controller's interface files as the kernel would show them
// once "+dmem" is in the parent's cgroup.subtree_control: dmem.max ("<region>
// max" per region) and dmem.min ("<region> 0"), the regions read from the
// root's dmem.capacity. A test decides which regions exist (which GPUs the
// kernel registered) by writing <cgroup root>/dmem.capacity before the pods
// start; without it the files are empty, as on a kernel without GPU regions.

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	v1 "k8s.io/api/core/v1"
	v1qos "k8s.io/kubernetes/pkg/apis/core/v1/helper/qos"
)

// rootControllers is what cgroup.controllers lists on the fake root (a v2
// hierarchy with the dmem controller, kernel 6.14+).
const rootControllers = "cpuset cpu io memory hugetlb pids rdma misc dmem\n"

// cgroupTree is one node's fake /sys/fs/cgroup.
type cgroupTree struct {
	root   string
	driver string // "cgroupfs" or "systemd", as the kubelet's --cgroup-driver
}

// ensureRoot creates the root with the files a cgroup v2 root has.
func (t cgroupTree) ensureRoot() error {
	if err := os.MkdirAll(t.root, 0o755); err != nil {
		return err
	}
	for name, content := range map[string]string{
		"cgroup.controllers":     rootControllers,
		"cgroup.subtree_control": rootControllers,
	} {
		p := filepath.Join(t.root, name)
		if _, err := os.Stat(p); os.IsNotExist(err) {
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// podDirs returns the QoS parent directories and the pod's own directory,
// relative to the root, outermost first.
func (t cgroupTree) podDirs(pod *v1.Pod) []string {
	qos := pod.Status.QOSClass
	if qos == "" {
		qos = v1qos.GetPodQOS(pod)
	}
	uid := string(pod.UID)
	if t.driver == "systemd" {
		escaped := strings.ReplaceAll(uid, "-", "_")
		switch qos {
		case v1.PodQOSGuaranteed:
			return []string{"kubepods.slice", "kubepods.slice/kubepods-pod" + escaped + ".slice"}
		default:
			class := strings.ToLower(string(qos))
			parent := "kubepods.slice/kubepods-" + class + ".slice"
			return []string{"kubepods.slice", parent, parent + "/kubepods-" + class + "-pod" + escaped + ".slice"}
		}
	}
	switch qos {
	case v1.PodQOSGuaranteed:
		return []string{"kubepods", "kubepods/pod" + uid}
	default:
		parent := "kubepods/" + strings.ToLower(string(qos))
		return []string{"kubepods", parent, parent + "/pod" + uid}
	}
}

// podPath is the absolute directory of the pod's cgroup.
func (t cgroupTree) podPath(pod *v1.Pod) string {
	dirs := t.podDirs(pod)
	return filepath.Join(t.root, dirs[len(dirs)-1])
}

// ensurePod creates the pod cgroup (and its QoS parents) with dmem files.
func (t cgroupTree) ensurePod(pod *v1.Pod) error {
	if err := t.ensureRoot(); err != nil {
		return err
	}
	regions, err := t.regions()
	if err != nil {
		return err
	}
	for _, rel := range t.podDirs(pod) {
		dir := filepath.Join(t.root, rel)
		if _, err := os.Stat(dir); err == nil {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		var maxFile, minFile strings.Builder
		for _, r := range regions {
			fmt.Fprintf(&maxFile, "%s max\n", r)
			fmt.Fprintf(&minFile, "%s 0\n", r)
		}
		for name, content := range map[string]string{
			"cgroup.controllers": rootControllers,
			"dmem.max":           maxFile.String(),
			"dmem.min":           minFile.String(),
		} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// removePod removes the pod's cgroup directory (QoS parents stay, as on a node).
func (t cgroupTree) removePod(pod *v1.Pod) error {
	return os.RemoveAll(t.podPath(pod))
}

// regions lists the region names of the root's dmem.capacity ("<region> <bytes>").
func (t cgroupTree) regions() ([]string, error) {
	f, err := os.Open(filepath.Join(t.root, "dmem.capacity"))
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 0 {
			out = append(out, fields[0])
		}
	}
	return out, s.Err()
}
