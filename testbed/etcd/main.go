// Command etcd-testbed runs one single-member etcd server for the kube-relay test bed: the
// storage behind a real kube-apiserver on loopback. It wraps go.etcd.io/etcd/server/v3/embed so
// the test bed builds from Go modules alone, and it lives in its own module so etcd's
// dependency versions never mix with Kubernetes'.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	dataDir := flag.String("data-dir", "", "directory for the member's data (required)")
	client := flag.String("listen-client-url", "http://127.0.0.1:0", "client URL (loopback; port 0 picks one)")
	peer := flag.String("listen-peer-url", "http://127.0.0.1:0", "peer URL (loopback; port 0 picks one)")
	readyTimeout := flag.Duration("ready-timeout", 60*time.Second, "give up if not ready by then")
	flag.Parse()
	if *dataDir == "" {
		log.Fatal("etcd-testbed: --data-dir is required")
	}
	clientURL, err := url.Parse(*client)
	if err != nil {
		log.Fatalf("etcd-testbed: --listen-client-url: %v", err)
	}
	peerURL, err := url.Parse(*peer)
	if err != nil {
		log.Fatalf("etcd-testbed: --listen-peer-url: %v", err)
	}

	cfg := embed.NewConfig()
	cfg.Name = "testbed"
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	// A test bed member never needs durability across power loss; fsync dominates start-up
	// and write latency on a small machine.
	cfg.UnsafeNoFsync = true

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd-testbed: start: %v", err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		// The harness waits for this line, which names the port really bound (the client URL
		// may ask for port 0), before starting kube-apiserver.
		fmt.Printf("etcd ready on http://%s\n", e.Clients[0].Addr().String())
	case <-time.After(*readyTimeout):
		e.Server.Stop()
		log.Fatalf("etcd-testbed: not ready after %s", *readyTimeout)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-e.Err():
		log.Fatalf("etcd-testbed: %v", err)
	case <-sig:
	}
}
