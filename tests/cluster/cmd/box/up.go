package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func init() {
	// Children get Pdeathsig, which fires when the *thread* that started them
	// exits; pin the main goroutine (which starts all children) to its thread.
	runtime.LockOSThread()
}

// child is one supervised component process.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

// boxLayout holds every path `box up` writes; all of them live in the state dir.
type boxLayout struct {
	dir, pki, logs, kubeconfig, tokens string
}

func newLayout(dir string) boxLayout {
	return boxLayout{
		dir:        dir,
		pki:        filepath.Join(dir, "pki"),
		logs:       filepath.Join(dir, "logs"),
		kubeconfig: filepath.Join(dir, "kubeconfig"),
		tokens:     filepath.Join(dir, "pki", "tokens.csv"),
	}
}

// freePorts reserves n distinct loopback ports by binding them all at once.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("reserve loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// tail returns the last n lines of a file (best effort).
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func runUp(args []string) int {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	stateDir := fs.String("state-dir", "", "directory for all state, logs and the kubeconfig (required)")
	nodes := fs.String("nodes", "node-a", "comma-separated simulated node names")
	exitOnStdin := fs.Bool("exit-on-stdin-close", false, "stop everything when stdin is closed (for test harnesses)")
	readyTimeout := fs.Duration("ready-timeout", 120*time.Second, "how long each start-up step may take")
	verbosity := fs.Int("v", 1, "klog verbosity of the components")
	removeState := fs.Bool("remove-state-dir-on-exit", false, "delete the state dir after a clean stop (kept when a component failed)")
	_ = fs.Parse(args)
	if *stateDir == "" {
		fmt.Fprintln(os.Stderr, "up: --state-dir is required")
		return 2
	}
	nodeNames := splitNodes(*nodes)
	if len(nodeNames) == 0 {
		fmt.Fprintln(os.Stderr, "up: --nodes must name at least one node")
		return 2
	}
	dir, err := filepath.Abs(*stateDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "up: %v\n", err)
		return 1
	}
	lay := newLayout(dir)
	for _, d := range []string{lay.dir, lay.pki, lay.logs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "up: %v\n", err)
			return 1
		}
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "up: locate own binary: %v\n", err)
		return 1
	}

	stop := make(chan string, 4)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { s := <-sigs; stop <- s.String() }()
	if *exitOnStdin {
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); stop <- "stdin closed" }()
	}

	s := &supervisor{self: self, lay: lay, stop: stop}
	code := s.run(nodeNames, *readyTimeout, *verbosity)
	s.shutdown()
	if *removeState && code == 0 {
		if err := os.RemoveAll(lay.dir); err != nil {
			fmt.Fprintf(os.Stderr, "up: remove state dir: %v\n", err)
		}
	}
	return code
}

func splitNodes(s string) []string {
	var out []string
	for _, n := range strings.Split(s, ",") {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out
}

type supervisor struct {
	self     string
	lay      boxLayout
	stop     chan string
	children []*child
	exited   chan *child
}

func (s *supervisor) start(name string, args ...string) (*child, error) {
	logPath := filepath.Join(s.lay.logs, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(s.self, append([]string{name}, args...)...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Dir = s.lay.dir
	// Own process group: a terminal Ctrl-C reaches only `up`, which stops the
	// children in order. Pdeathsig: children never outlive a killed `up`.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	s.children = append(s.children, c)
	go func() {
		c.err = cmd.Wait()
		_ = f.Close()
		close(c.done)
		s.exited <- c
	}()
	fmt.Fprintf(os.Stderr, "up: started %s (pid %d, log %s)\n", name, cmd.Process.Pid, logPath)
	return c, nil
}

// waitFor polls check until it succeeds, the deadline passes, a child exits or a stop is requested.
func (s *supervisor) waitFor(what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not ready after %v: %v", what, timeout, last)
		}
		select {
		case c := <-s.exited:
			return fmt.Errorf("%s exited while waiting for %s (%v); log tail:\n%s", c.name, what, c.err, tail(c.logPath, 30))
		case why := <-s.stop:
			return &stopRequested{why}
		case <-time.After(100 * time.Millisecond):
		}
	}
}

type stopRequested struct{ why string }

func (e *stopRequested) Error() string { return "stop requested: " + e.why }

func (s *supervisor) run(nodes []string, timeout time.Duration, verbosity int) int {
	s.exited = make(chan *child, 8)
	if err := s.bringUp(nodes, timeout, verbosity); err != nil {
		var sr *stopRequested
		if errors.As(err, &sr) {
			fmt.Fprintf(os.Stderr, "up: %v\n", err)
			return 0
		}
		fmt.Fprintf(os.Stderr, "up: FAILED: %v\n", err)
		return 1
	}
	select {
	case why := <-s.stop:
		fmt.Fprintf(os.Stderr, "up: %s, stopping\n", why)
		return 0
	case c := <-s.exited:
		fmt.Fprintf(os.Stderr, "up: FAILED: %s exited unexpectedly (%v); log tail:\n%s\n", c.name, c.err, tail(c.logPath, 30))
		return 1
	}
}

func (s *supervisor) bringUp(nodes []string, timeout time.Duration, verbosity int) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdPort, peerPort, apiPort := ports[0], ports[1], ports[2]
	creds, err := writeCredentials(s.lay, apiPort)
	if err != nil {
		return fmt.Errorf("write credentials: %w", err)
	}
	v := fmt.Sprintf("--v=%d", verbosity)
	gates := "--feature-gates=" + featureGatesFlag()

	if _, err := s.start("etcd", "--data-dir", filepath.Join(s.lay.dir, "etcd"),
		fmt.Sprintf("--client-port=%d", etcdPort), fmt.Sprintf("--peer-port=%d", peerPort)); err != nil {
		return err
	}
	etcdHealth := fmt.Sprintf("http://127.0.0.1:%d/health", etcdPort)
	if err := s.waitFor("etcd", timeout, func() error { return httpOK(http.DefaultClient, etcdHealth, "") }); err != nil {
		return err
	}

	if _, err := s.start("apiserver",
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", etcdPort),
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir="+filepath.Join(s.lay.dir, "apiserver"),
		"--tls-cert-file="+creds.servingCert, "--tls-private-key-file="+creds.servingKey,
		"--client-ca-file="+creds.caCert,
		"--token-auth-file="+s.lay.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+creds.saPub, "--service-account-signing-key-file="+creds.saKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		// No node lifecycle controller and no token controller in the box:
		// nodes are not tainted at creation and pods need no token volume.
		"--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
		"--runtime-config=resource.k8s.io/v1beta1=true,resource.k8s.io/v1beta2=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		gates, v,
	); err != nil {
		return err
	}
	apiClient, err := creds.httpClient()
	if err != nil {
		return err
	}
	readyz := fmt.Sprintf("https://127.0.0.1:%d/readyz", apiPort)
	if err := s.waitFor("apiserver /readyz", timeout, func() error { return httpOK(apiClient, readyz, creds.token) }); err != nil {
		return err
	}

	if _, err := s.start("controller-manager",
		"--kubeconfig="+s.lay.kubeconfig,
		"--secure-port=0",
		"--leader-elect=true",
		"--controllers=resourceclaim-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,device-taint-eviction-controller,deployment-controller,replicaset-controller",
		"--use-service-account-credentials=false",
		gates, v,
	); err != nil {
		return err
	}
	if _, err := s.start("scheduler",
		"--kubeconfig="+s.lay.kubeconfig,
		"--secure-port=0",
		"--leader-elect=true",
		gates, v,
	); err != nil {
		return err
	}
	if _, err := s.start("node-agent",
		"--kubeconfig="+s.lay.kubeconfig,
		"--state-dir="+s.lay.dir,
		"--nodes="+strings.Join(nodes, ","),
		gates, v,
	); err != nil {
		return err
	}

	cfg, err := clientcmd.BuildConfigFromFlags("", s.lay.kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx := context.Background()
	for _, lease := range []string{"kube-scheduler", "kube-controller-manager"} {
		if err := s.waitFor("lease "+lease, timeout, func() error { return leaseHeld(ctx, client, lease) }); err != nil {
			return err
		}
	}
	for _, n := range nodes {
		if err := s.waitFor("node "+n+" Ready", timeout, func() error { return nodeReady(ctx, client, n) }); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "up: ready (Kubernetes %s, apiserver https://127.0.0.1:%d, nodes %s)\n", kubernetesVersion(), apiPort, strings.Join(nodes, ","))
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(w, "export KUBECONFIG=%s\n", s.lay.kubeconfig)
	_ = w.Flush()
	return nil
}

func httpOK(c *http.Client, url, token string) error {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := c.Do(req.WithContext(ctx))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

func leaseHeld(ctx context.Context, c kubernetes.Interface, name string) error {
	l, err := c.CoordinationV1().Leases("kube-system").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	return leaseFresh(l)
}

func leaseFresh(l *coordinationv1.Lease) error {
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" {
		return fmt.Errorf("lease %s has no holder", l.Name)
	}
	return nil
}

func nodeReady(ctx context.Context, c kubernetes.Interface, name string) error {
	n, err := c.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == v1.NodeReady && cond.Status == v1.ConditionTrue {
			return nil
		}
	}
	return fmt.Errorf("node %s not Ready", name)
}

// shutdown stops children in reverse start order: SIGTERM, then SIGKILL after a grace period.
func (s *supervisor) shutdown() {
	for i := len(s.children) - 1; i >= 0; i-- {
		c := s.children[i]
		select {
		case <-c.done:
			continue
		default:
		}
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(15 * time.Second):
			fmt.Fprintf(os.Stderr, "up: %s did not stop after SIGTERM, killing\n", c.name)
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		fmt.Fprintf(os.Stderr, "up: stopped %s\n", c.name)
	}
}

// credentials are the files and secrets `up` generates for one box.
type credentials struct {
	caCert, servingCert, servingKey, saKey, saPub string
	token                                         string
	caPEM                                         []byte
}

func (c *credentials) httpClient() (*http.Client, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.caPEM) {
		return nil, errors.New("parse generated CA")
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}, nil
}
