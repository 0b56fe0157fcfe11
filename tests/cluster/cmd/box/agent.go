package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/wait"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	pluginwatcherapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/config"
	kubeletevents "k8s.io/kubernetes/pkg/kubelet/events"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/utils/ptr"
)

// Names the node agent publishes; tests assert on them.
const (
	// resultAnnotation holds a JSON object: container name -> container result.
	resultAnnotation = "box.gpu-dra.dev/containers"
	// preparedCondition is the pod condition the agent maintains (True after a
	// successful prepare and CDI resolution, False with the error otherwise).
	preparedCondition v1.PodConditionType = "ResourcesPrepared"
)

func runNodeAgent(args []string) int {
	fs := flag.NewFlagSet("node-agent", flag.ExitOnError)
	klog.InitFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig (required)")
	stateDir := fs.String("state-dir", "", "box state dir; node N lives in <state-dir>/nodes/N (required)")
	nodes := fs.String("nodes", "node-a", "comma-separated node names served by this process")
	gates := fs.String("feature-gates", "", "feature gates (same syntax as the kubelet)")
	cgroupDriver := fs.String("cgroup-driver", "cgroupfs", "how pod cgroups are named in <state-dir>/nodes/N/cgroup: cgroupfs or systemd (the kubelet's --cgroup-driver)")
	_ = fs.Parse(args)
	if *kubeconfig == "" || *stateDir == "" {
		fmt.Fprintln(os.Stderr, "node-agent: --kubeconfig and --state-dir are required")
		return 2
	}
	if *cgroupDriver != "cgroupfs" && *cgroupDriver != "systemd" {
		fmt.Fprintln(os.Stderr, "node-agent: --cgroup-driver must be cgroupfs or systemd")
		return 2
	}
	if *gates != "" {
		if err := utilfeature.DefaultMutableFeatureGate.Set(*gates); err != nil {
			fmt.Fprintf(os.Stderr, "node-agent: --feature-gates: %v\n", err)
			return 2
		}
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "node-agent: %v\n", err)
		return 1
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	ctx = klog.NewContext(ctx, klog.Background())

	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for _, name := range splitNodes(*nodes) {
		a, err := newAgent(cfg, *stateDir, name, *cgroupDriver)
		if err != nil {
			fmt.Fprintf(os.Stderr, "node-agent: node %s: %v\n", name, err)
			return 1
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.run(ctx); err != nil {
				errs <- fmt.Errorf("node %s: %w", a.name, err)
			}
		}()
	}
	select {
	case <-ctx.Done():
		klog.Info("node-agent: stopping")
		wg.Wait()
		return 0
	case err := <-errs:
		klog.ErrorS(err, "node-agent failed")
		return 1
	}
}

// agent simulates one kubelet node: Node object, Lease, plugin manager with
// the DRA handler, the kubelet DRA manager, and a "runtime" that resolves CDI
// devices into an OCI spec instead of starting containers.
type agent struct {
	name                 string
	root, cdiDir, outDir string
	cgroups              cgroupTree
	client, draClient    kubernetes.Interface
	recorder             record.EventRecorder
	broadcaster          record.EventBroadcaster
	manager              *dra.Manager
	wiped                chan struct{}
	podInformer          cache.SharedIndexInformer
	queue                workqueue.TypedRateLimitingInterface[string]
	mu                   sync.Mutex
	running              map[types.UID]bool
	lastSeen             map[string]*v1.Pod
	synced               bool
}

func newAgent(cfg *rest.Config, stateDir, name, cgroupDriver string) (*agent, error) {
	base := filepath.Join(stateDir, "nodes", name)
	a := &agent{
		name:     name,
		cgroups:  cgroupTree{root: filepath.Join(base, "cgroup"), driver: cgroupDriver},
		root:     filepath.Join(base, "kubelet"),
		cdiDir:   filepath.Join(base, "cdi"),
		outDir:   filepath.Join(base, "containers"),
		wiped:    make(chan struct{}),
		running:  map[types.UID]bool{},
		lastSeen: map[string]*v1.Pod{},
	}
	for _, d := range []string{filepath.Join(a.root, "plugins_registry"), filepath.Join(a.root, "plugins"), a.cdiDir, a.outDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := a.cgroups.ensureRoot(); err != nil {
		return nil, err
	}
	var err error
	if a.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	// The DRA manager's client is observed so that the node reports Ready only
	// after the kubelet's start-up wipe of this node's ResourceSlices is done
	// (otherwise a slice created right after "Ready" could be wiped).
	draCfg := rest.CopyConfig(cfg)
	var once sync.Once
	draCfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(req *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(req)
			if err == nil && req.Method == http.MethodDelete && resp.StatusCode < 300 &&
				strings.HasSuffix(req.URL.Path, "/resourceslices") &&
				strings.Contains(req.URL.Query().Get("fieldSelector"), "spec.nodeName="+name) {
				once.Do(func() { close(a.wiped) })
			}
			return resp, err
		})
	})
	if a.draClient, err = kubernetes.NewForConfig(draCfg); err != nil {
		return nil, err
	}
	a.broadcaster = record.NewBroadcaster()
	a.recorder = a.broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: "kubelet", Host: name})
	a.queue = workqueue.NewTypedRateLimitingQueue(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](250*time.Millisecond, 10*time.Second))
	return a, nil
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (a *agent) run(ctx context.Context) error {
	logger := klog.FromContext(ctx).WithValues("node", a.name)
	ctx = klog.NewContext(ctx, logger)
	a.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	defer a.broadcaster.Shutdown()

	if err := a.registerNode(ctx); err != nil {
		return fmt.Errorf("register node: %w", err)
	}

	factory := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.name).String()
		}))
	a.podInformer = factory.Core().V1().Pods().Informer()

	manager, err := dra.NewManager(logger, a.draClient, a.root)
	if err != nil {
		return fmt.Errorf("DRA manager: %w", err)
	}
	a.manager = manager
	sourcesReady := config.NewSourcesReady(func(sets.Set[string]) bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.synced
	})
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return a.client.CoreV1().Nodes().Get(ctx, a.name, metav1.GetOptions{})
	}
	if err := manager.Start(ctx, a.activePods, getNode, sourcesReady); err != nil {
		return fmt.Errorf("start DRA manager: %w", err)
	}
	select {
	case <-a.wiped:
		logger.Info("start-up ResourceSlice wipe done")
	case <-time.After(30 * time.Second):
		logger.Info("start-up ResourceSlice wipe not observed after 30s, continuing")
	case <-ctx.Done():
		return nil
	}

	// The kubelet's plugin manager with the DRA handler, watching plugins_registry.
	pm := pluginmanager.NewPluginManager(filepath.Join(a.root, "plugins_registry"), a.recorder)
	pm.AddHandler(pluginwatcherapi.DRAPlugin, manager.GetWatcherHandler())
	stopCh := make(chan struct{})
	go pm.Run(ctx, sourcesReady, stopCh)
	defer close(stopCh)

	_, err = a.podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.enqueue(obj) },
		UpdateFunc: func(_, obj any) { a.enqueue(obj) },
		DeleteFunc: func(obj any) { a.enqueue(obj) },
	})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), a.podInformer.HasSynced) {
		return nil
	}
	a.mu.Lock()
	a.synced = true
	a.mu.Unlock()

	if err := a.setNodeReady(ctx); err != nil {
		return fmt.Errorf("mark node Ready: %w", err)
	}
	go wait.UntilWithContext(ctx, a.heartbeat, 10*time.Second)
	go wait.UntilWithContext(ctx, a.worker, time.Second)
	logger.Info("node agent ready", "kubeletRoot", a.root, "cdiDir", a.cdiDir, "containers", a.outDir)
	<-ctx.Done()
	a.queue.ShutDown()
	factory.Shutdown()
	return nil
}

func (a *agent) enqueue(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	if pod, ok := obj.(*v1.Pod); ok {
		a.mu.Lock()
		a.lastSeen[key] = pod
		a.mu.Unlock()
	} else if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		if pod, ok := tomb.Obj.(*v1.Pod); ok {
			a.mu.Lock()
			a.lastSeen[key] = pod
			a.mu.Unlock()
		}
	}
	a.queue.Add(key)
}

// activePods lists pods bound to this node that are not terminal (kubelet semantics for the DRA reconcile loop).
func (a *agent) activePods() []*v1.Pod {
	var out []*v1.Pod
	for _, obj := range a.podInformer.GetStore().List() {
		pod := obj.(*v1.Pod)
		if pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed {
			continue
		}
		out = append(out, pod)
	}
	return out
}

func (a *agent) worker(ctx context.Context) {
	for {
		key, quit := a.queue.Get()
		if quit {
			return
		}
		err := a.sync(ctx, key)
		if err != nil {
			klog.FromContext(ctx).Info("pod sync failed, retrying with backoff", "pod", key, "err", err)
			a.queue.AddRateLimited(key)
		} else {
			a.queue.Forget(key)
		}
		a.queue.Done(key)
	}
}

func (a *agent) sync(ctx context.Context, key string) error {
	obj, exists, err := a.podInformer.GetStore().GetByKey(key)
	if err != nil {
		return err
	}
	a.mu.Lock()
	last := a.lastSeen[key]
	a.mu.Unlock()
	if !exists {
		if last == nil {
			return nil
		}
		return a.terminate(ctx, key, last, false)
	}
	pod := obj.(*v1.Pod)
	if pod.DeletionTimestamp != nil || pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed {
		return a.terminate(ctx, key, pod, pod.DeletionTimestamp != nil)
	}
	a.mu.Lock()
	done := a.running[pod.UID]
	a.mu.Unlock()
	if done {
		return nil
	}
	// As the kubelet's SyncPod: the pod cgroup exists before PrepareResources.
	if err := a.cgroups.ensurePod(pod); err != nil {
		return fmt.Errorf("pod cgroup: %w", err)
	}
	results, err := a.prepare(ctx, pod)
	if err != nil {
		a.recorder.Eventf(pod, v1.EventTypeWarning, kubeletevents.FailedPrepareDynamicResources, "Failed to prepare dynamic resources: %v", err)
		if serr := a.setPodPrepareFailed(ctx, pod, err); serr != nil {
			klog.FromContext(ctx).Info("update pod status", "pod", key, "err", serr)
		}
		return err
	}
	if err := a.publish(ctx, pod, results); err != nil {
		return err
	}
	a.mu.Lock()
	a.running[pod.UID] = true
	a.mu.Unlock()
	klog.FromContext(ctx).Info("pod running", "pod", key)
	return nil
}

// terminate unprepares the pod's claims, removes its container results and,
// like a kubelet finishing termination, deletes the pod object.
func (a *agent) terminate(ctx context.Context, key string, pod *v1.Pod, deleteObject bool) error {
	if err := a.manager.UnprepareResources(ctx, pod); err != nil {
		a.recorder.Eventf(pod, v1.EventTypeWarning, "FailedUnprepareDynamicResources", "Failed to unprepare dynamic resources: %v", err)
		return err
	}
	// The kubelet removes a terminated pod's cgroup after its resources are released.
	if err := a.cgroups.removePod(pod); err != nil {
		return fmt.Errorf("pod cgroup: %w", err)
	}
	matches, _ := filepath.Glob(filepath.Join(a.outDir, fmt.Sprintf("%s_%s_*.json", pod.Namespace, pod.Name)))
	for _, m := range matches {
		_ = os.Remove(m)
	}
	if deleteObject {
		err := a.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To[int64](0),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return err
		}
	}
	a.mu.Lock()
	delete(a.running, pod.UID)
	if deleteObject || pod.DeletionTimestamp == nil {
		if _, exists, _ := a.podInformer.GetStore().GetByKey(key); !exists {
			delete(a.lastSeen, key)
		}
	}
	a.mu.Unlock()
	return nil
}

// containerResult is what a container would receive from the runtime: the
// CDI device ids the DRA manager returned and the OCI spec edits they resolve to.
type containerResult struct {
	Node        string         `json:"node"`
	Namespace   string         `json:"namespace"`
	Pod         string         `json:"pod"`
	PodUID      types.UID      `json:"podUID"`
	Container   string         `json:"container"`
	CDIDevices  []string       `json:"cdiDevices"`
	Env         []string       `json:"env"`
	DeviceNodes []deviceNode   `json:"deviceNodes"`
	Mounts      []mountSummary `json:"mounts"`
	Hooks       any            `json:"hooks,omitempty"`
}

type deviceNode struct {
	Path  string `json:"path"`
	Type  string `json:"type"`
	Major int64  `json:"major"`
	Minor int64  `json:"minor"`
}

type mountSummary struct {
	Destination string   `json:"destination"`
	Source      string   `json:"source"`
	Type        string   `json:"type,omitempty"`
	Options     []string `json:"options,omitempty"`
}

// prepare calls the kubelet DRA manager and resolves every container's CDI ids.
func (a *agent) prepare(ctx context.Context, pod *v1.Pod) ([]containerResult, error) {
	if err := a.manager.PrepareResources(ctx, pod); err != nil {
		return nil, err
	}
	var results []containerResult
	containers := append(append([]v1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for i := range containers {
		c := &containers[i]
		info, err := a.manager.GetResources(pod, c)
		if err != nil {
			return nil, fmt.Errorf("container %s: %w", c.Name, err)
		}
		ids := make([]string, 0, len(info.CDIDevices))
		for _, d := range info.CDIDevices {
			ids = append(ids, d.Name)
		}
		r, err := resolveCDI(a.cdiDir, c, ids)
		if err != nil {
			return nil, fmt.Errorf("container %s: %w", c.Name, err)
		}
		r.Node, r.Namespace, r.Pod, r.PodUID = a.name, pod.Namespace, pod.Name, pod.UID
		results = append(results, *r)
	}
	return results, nil
}

// publish writes one JSON file per container, the pod annotation, and the Running status.
func (a *agent) publish(ctx context.Context, pod *v1.Pod, results []containerResult) error {
	byName := map[string]containerResult{}
	for _, r := range results {
		data, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return err
		}
		path := filepath.Join(a.outDir, fmt.Sprintf("%s_%s_%s.json", r.Namespace, r.Pod, r.Container))
		if err := writeFileAtomic(path, append(data, '\n')); err != nil {
			return err
		}
		byName[r.Container] = r
	}
	summary, err := json.Marshal(byName)
	if err != nil {
		return err
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{resultAnnotation: string(summary)}}})
	if err != nil {
		return err
	}
	if _, err := a.client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("annotate pod: %w", err)
	}
	return a.updatePodStatus(ctx, pod, func(st *v1.PodStatus) {
		now := metav1.Now()
		st.Phase = v1.PodRunning
		st.HostIP = "127.0.0.1"
		st.HostIPs = []v1.HostIP{{IP: "127.0.0.1"}}
		if st.StartTime == nil {
			st.StartTime = &now
		}
		for _, t := range []v1.PodConditionType{preparedCondition, v1.PodReadyToStartContainers, v1.PodInitialized, v1.ContainersReady, v1.PodReady} {
			setPodCondition(st, v1.PodCondition{Type: t, Status: v1.ConditionTrue, LastTransitionTime: now})
		}
		st.InitContainerStatuses = nil
		for _, c := range pod.Spec.InitContainers {
			st.InitContainerStatuses = append(st.InitContainerStatuses, v1.ContainerStatus{
				Name: c.Name, Image: c.Image, ImageID: "box://" + c.Image,
				ContainerID: fmt.Sprintf("box://%s/%s", pod.UID, c.Name), Ready: true,
				State: v1.ContainerState{Terminated: &v1.ContainerStateTerminated{Reason: "Completed", StartedAt: now, FinishedAt: now}},
			})
		}
		st.ContainerStatuses = nil
		for _, c := range pod.Spec.Containers {
			st.ContainerStatuses = append(st.ContainerStatuses, v1.ContainerStatus{
				Name: c.Name, Image: c.Image, ImageID: "box://" + c.Image,
				ContainerID: fmt.Sprintf("box://%s/%s", pod.UID, c.Name), Ready: true, Started: ptr.To(true),
				State: v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
			})
		}
	})
}

func (a *agent) setPodPrepareFailed(ctx context.Context, pod *v1.Pod, cause error) error {
	return a.updatePodStatus(ctx, pod, func(st *v1.PodStatus) {
		setPodCondition(st, v1.PodCondition{
			Type: preparedCondition, Status: v1.ConditionFalse, Reason: kubeletevents.FailedPrepareDynamicResources,
			Message: cause.Error(), LastTransitionTime: metav1.Now(),
		})
	})
}

func (a *agent) updatePodStatus(ctx context.Context, pod *v1.Pod, mutate func(*v1.PodStatus)) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := a.client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.UID != pod.UID {
			return fmt.Errorf("pod %s/%s was replaced", pod.Namespace, pod.Name)
		}
		mutate(&cur.Status)
		_, err = a.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
}

// setPodCondition replaces the condition of the same type, keeping the
// transition time when the status did not change.
func setPodCondition(st *v1.PodStatus, c v1.PodCondition) {
	for i := range st.Conditions {
		if st.Conditions[i].Type == c.Type {
			if st.Conditions[i].Status == c.Status {
				c.LastTransitionTime = st.Conditions[i].LastTransitionTime
			}
			st.Conditions[i] = c
			return
		}
	}
	st.Conditions = append(st.Conditions, c)
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// registerNode creates (or takes over) the Node object, NotReady until the agent is ready.
func (a *agent) registerNode(ctx context.Context) error {
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.name,
			Labels: map[string]string{
				"kubernetes.io/hostname": a.name,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     "amd64",
				"box.gpu-dra.dev/node":   "true",
			},
		},
	}
	return wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := a.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			klog.FromContext(ctx).Info("create node, retrying", "err", err)
			return false, nil
		}
		if err := a.updateNodeStatus(ctx, false); err != nil {
			klog.FromContext(ctx).Info("node status, retrying", "err", err)
			return false, nil
		}
		return true, nil
	})
}

func (a *agent) setNodeReady(ctx context.Context) error {
	if err := a.updateNodeStatus(ctx, true); err != nil {
		return err
	}
	return a.renewLease(ctx)
}

func (a *agent) heartbeat(ctx context.Context) {
	if err := a.updateNodeStatus(ctx, true); err != nil {
		klog.FromContext(ctx).Info("node status heartbeat failed", "err", err)
	}
	if err := a.renewLease(ctx); err != nil {
		klog.FromContext(ctx).Info("lease renewal failed", "err", err)
	}
}

func (a *agent) updateNodeStatus(ctx context.Context, ready bool) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := a.client.CoreV1().Nodes().Get(ctx, a.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		capacity := v1.ResourceList{
			v1.ResourceCPU:              resource.MustParse("16"),
			v1.ResourceMemory:           resource.MustParse("64Gi"),
			v1.ResourcePods:             resource.MustParse("110"),
			v1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
		}
		n.Status.Capacity = capacity
		n.Status.Allocatable = capacity
		n.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "127.0.0.1"}, {Type: v1.NodeHostName, Address: a.name}}
		n.Status.NodeInfo.KubeletVersion = kubernetesVersion()
		n.Status.NodeInfo.OperatingSystem = "linux"
		n.Status.NodeInfo.Architecture = "amd64"
		n.Status.NodeInfo.ContainerRuntimeVersion = "box://" + kubernetesVersion()
		now := metav1.Now()
		cond := v1.NodeCondition{Type: v1.NodeReady, Status: v1.ConditionFalse, Reason: "KubeletNotReady",
			Message: "box node agent starting", LastHeartbeatTime: now, LastTransitionTime: now}
		if ready {
			cond.Status, cond.Reason, cond.Message = v1.ConditionTrue, "KubeletReady", "box node agent is posting ready status"
		}
		found := false
		for i := range n.Status.Conditions {
			if n.Status.Conditions[i].Type == v1.NodeReady {
				if n.Status.Conditions[i].Status == cond.Status {
					cond.LastTransitionTime = n.Status.Conditions[i].LastTransitionTime
				}
				n.Status.Conditions[i] = cond
				found = true
			}
		}
		if !found {
			n.Status.Conditions = append(n.Status.Conditions, cond)
		}
		_, err = a.client.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

func (a *agent) renewLease(ctx context.Context) error {
	leases := a.client.CoordinationV1().Leases(v1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(ctx, a.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err := a.client.CoreV1().Nodes().Get(ctx, a.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: a.name, Namespace: v1.NamespaceNodeLease,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(a.name), LeaseDurationSeconds: ptr.To[int32](40), RenewTime: &now},
		}
		_, err = leases.Create(ctx, l, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	l.Spec.RenewTime = &now
	_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	return err
}
