// Command box is the gpu-dra test rig: one binary that holds an etcd, the
// upstream kube-apiserver, kube-controller-manager and kube-scheduler, and a
// node agent built from upstream kubelet code (plugin manager + DRA manager),
// selected busybox style by the first argument.
//
// `box up` starts all of them as child processes on loopback and supervises
// them; the other subcommands run one component in the foreground.
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"strings"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = `usage: box <subcommand> [flags]

subcommands:
  up                  start etcd, apiserver, controller-manager, scheduler and node agents
  etcd                embedded etcd server
  apiserver           kube-apiserver (upstream flags)
  controller-manager  kube-controller-manager (upstream flags)
  scheduler           kube-scheduler (upstream flags)
  node-agent          simulated kubelet nodes (plugin manager + DRA manager + CDI)
  example-plugin      minimal DRA kubelet plugin (upstream kubeletplugin helper), rig self-test only
  version             print the Kubernetes version this binary is built from
`

// kubernetesVersion returns the k8s.io/kubernetes module version recorded in
// the binary's build info (go.mod is the single place that pins it).
func kubernetesVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, dep := range info.Deps {
		if dep.Path == "k8s.io/kubernetes" {
			return dep.Version
		}
	}
	return "unknown"
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	sub, args := os.Args[1], os.Args[2:]
	fmt.Fprintf(os.Stderr, "box %s: Kubernetes %s\n", sub, kubernetesVersion())
	switch sub {
	case "up":
		os.Exit(runUp(args))
	case "etcd":
		os.Exit(runEtcd(args))
	case "node-agent":
		os.Exit(runNodeAgent(args))
	case "example-plugin":
		os.Exit(runExamplePlugin(args))
	case "apiserver":
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "controller-manager":
		cmd := controllermanager.NewControllerManagerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "scheduler":
		cmd := scheduler.NewSchedulerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "version", "--version", "-version":
		fmt.Println(kubernetesVersion())
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "box: unknown subcommand %q\n%s", sub, usage)
		os.Exit(2)
	}
}

// featureGates is the --feature-gates value shared by every component: the DRA
// beta gates of the pinned release (1.37.2) switched on explicitly, including
// DRASchedulerFilterTimeout (beta, off by default in 1.37). Device taints, taint
// rules, extended resources and claim device status are GA in 1.37 and on by
// default, so they are not listed.
var featureGates = []string{
	"DRAConsumableCapacity=true",
	"DRADeviceBindingConditions=true",
	"DRAPartitionableDevices=true",
	"DRAResourceClaimGranularStatusAuthorization=true",
	"DRASchedulerFilterTimeout=true",
	"ResourceHealthStatus=true",
	"ResourceHealthStatusMessage=true",
}

func featureGatesFlag() string { return strings.Join(featureGates, ",") }
