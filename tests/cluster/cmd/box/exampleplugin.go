package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// exampleCDIKind is the CDI kind of the example plugin's per-claim specs.
const exampleCDIKind = "example.box.gpu-dra.dev/claim"

// runExamplePlugin runs a minimal DRA kubelet plugin built on the upstream
// kubeletplugin helper. It exists to prove the box's prepare path end to end
// (registration, NodePrepareResources, CDI resolution, Running, unprepare);
// it is a rig fixture, not a model of the gpu-dra driver.
func runExamplePlugin(args []string) int {
	fs := flag.NewFlagSet("example-plugin", flag.ExitOnError)
	klog.InitFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig (required)")
	node := fs.String("node", "node-a", "node name")
	kubeletRoot := fs.String("kubelet-root", "", "the node's kubelet root dir (required)")
	cdiDir := fs.String("cdi-dir", "", "the node's CDI spec dir (required)")
	driver := fs.String("driver-name", "example.box.gpu-dra.dev", "DRA driver name")
	devices := fs.Int("devices", 2, "number of devices (dev-0 ... dev-N-1) to publish")
	exitOnStdin := fs.Bool("exit-on-stdin-close", false, "stop when stdin is closed")
	_ = fs.Parse(args)
	if *kubeconfig == "" || *kubeletRoot == "" || *cdiDir == "" {
		fmt.Fprintln(os.Stderr, "example-plugin: --kubeconfig, --kubelet-root and --cdi-dir are required")
		return 2
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: %v\n", err)
		return 1
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: %v\n", err)
		return 1
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if *exitOnStdin {
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	}
	ctx = klog.NewContext(ctx, klog.Background().WithValues("driver", *driver, "node", *node))
	n, err := client.CoreV1().Nodes().Get(ctx, *node, metav1.GetOptions{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: node %s: %v\n", *node, err)
		return 1
	}
	p := &examplePlugin{driver: *driver, cdiDir: *cdiDir}
	dataDir := filepath.Join(*kubeletRoot, "plugins", *driver)
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: %v\n", err)
		return 1
	}
	helper, err := kubeletplugin.Start(ctx, p,
		kubeletplugin.DriverName(*driver),
		kubeletplugin.KubeClient(client),
		kubeletplugin.NodeName(n.Name),
		kubeletplugin.NodeUID(n.UID),
		kubeletplugin.RegistrarDirectoryPath(filepath.Join(*kubeletRoot, "plugins_registry")),
		kubeletplugin.PluginDataDirectoryPath(dataDir),
		kubeletplugin.HealthService(false),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: start: %v\n", err)
		return 1
	}
	defer helper.Stop()
	var devs []resourceapi.Device
	for i := 0; i < *devices; i++ {
		devs = append(devs, resourceapi.Device{Name: fmt.Sprintf("dev-%d", i)})
	}
	if err := helper.PublishResources(ctx, resourceslice.DriverResources{
		Pools: map[string]resourceslice.Pool{n.Name: {Slices: []resourceslice.Slice{{Devices: devs}}}},
	}); err != nil {
		fmt.Fprintf(os.Stderr, "example-plugin: publish: %v\n", err)
		return 1
	}
	klog.FromContext(ctx).Info("example plugin running")
	<-ctx.Done()
	return 0
}

type examplePlugin struct {
	driver, cdiDir string
}

func (p *examplePlugin) specPath(uid types.UID) string {
	return filepath.Join(p.cdiDir, fmt.Sprintf("%s_%s.json", strings.ReplaceAll(exampleCDIKind, "/", "-"), uid))
}

// PrepareResourceClaims writes one CDI spec per claim (env, /dev/null as
// device node, a read-only mount of the CDI dir) and returns its device ids.
func (p *examplePlugin) PrepareResourceClaims(_ context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := map[types.UID]kubeletplugin.PrepareResult{}
	for _, claim := range claims {
		if claim.Status.Allocation == nil {
			out[claim.UID] = kubeletplugin.PrepareResult{Err: errors.New("claim not allocated")}
			continue
		}
		spec := cdispec.Spec{Version: cdispec.CurrentVersion, Kind: exampleCDIKind}
		var result kubeletplugin.PrepareResult
		for _, r := range claim.Status.Allocation.Devices.Results {
			if r.Driver != p.driver {
				continue
			}
			name := fmt.Sprintf("%s-%s", claim.UID, r.Device)
			spec.Devices = append(spec.Devices, cdispec.Device{
				Name: name,
				ContainerEdits: cdispec.ContainerEdits{
					Env:         []string{"EXAMPLE_DEVICE=" + r.Device, "EXAMPLE_CLAIM=" + claim.Name},
					DeviceNodes: []*cdispec.DeviceNode{{Path: "/dev/null"}},
					Mounts:      []*cdispec.Mount{{HostPath: p.cdiDir, ContainerPath: "/example", Options: []string{"ro", "bind"}}},
				},
			})
			result.Devices = append(result.Devices, kubeletplugin.Device{
				Requests: []string{r.Request}, PoolName: r.Pool, DeviceName: r.Device,
				CDIDeviceIDs: []string{exampleCDIKind + "=" + name},
			})
		}
		data, err := json.Marshal(spec)
		if err == nil {
			err = writeFileAtomic(p.specPath(claim.UID), data)
		}
		if err != nil {
			result = kubeletplugin.PrepareResult{Err: err}
		}
		out[claim.UID] = result
	}
	return out, nil
}

// UnprepareResourceClaims removes the claims' CDI specs.
func (p *examplePlugin) UnprepareResourceClaims(_ context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := map[types.UID]error{}
	for _, c := range claims {
		err := os.Remove(p.specPath(c.UID))
		if errors.Is(err, os.ErrNotExist) {
			err = nil
		}
		out[c.UID] = err
	}
	return out, nil
}

func (p *examplePlugin) HandleError(ctx context.Context, err error, msg string) {
	klog.FromContext(ctx).Error(err, msg)
}

// WatchHealthStatus: the example plugin reports no device health (1.37 helper API).
func (p *examplePlugin) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}
