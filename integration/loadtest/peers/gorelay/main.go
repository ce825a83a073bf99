// Command gorelay is the least a Go proxy can do per connection: accept,
// dial the backend, copy bytes both ways with io.Copy (splice), pass each
// side's FIN on, close. It parses nothing, so it is a floor for what Go's
// runtime and net package cost sluice per upgrade, measured beside sluice
// and HAProxy by the load harness:
//
//	go build -o /tmp/gorelay ./integration/loadtest/peers/gorelay
//	go run ./integration/loadtest -mode handshakes -compare 'cmd:exec /tmp/gorelay,sluice,cmd:sh integration/loadtest/peers/haproxy.sh'
//
// It listens on $PROXY_LISTEN and dials $BACKEND_ADDR, as every cmd target.
package main

import (
	"io"
	"log"
	"net"
	"os"
)

func main() {
	ln, err := net.Listen("tcp", os.Getenv("PROXY_LISTEN"))
	if err != nil {
		log.Fatal(err)
	}
	backend := os.Getenv("BACKEND_ADDR")
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go relay(c.(*net.TCPConn), backend)
	}
}

// relay copies client to upstream in its own goroutine and upstream to
// client in a second one, as any two-goroutine Go proxy does.
func relay(c *net.TCPConn, backend string) {
	defer c.Close()
	u, err := net.Dial("tcp", backend)
	if err != nil {
		return
	}
	up := u.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(c, up)
		c.CloseWrite()
		close(done)
	}()
	io.Copy(up, c)
	up.CloseWrite()
	<-done
}
