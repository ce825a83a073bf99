// Command gotunnel is the floor of a Go proxy, for the load harness: it
// accepts on $PROXY_LISTEN, dials $BACKEND_ADDR, and copies bytes both
// ways with io.Copy (splice(2) on Linux), two goroutines per connection,
// no HTTP and no WebSocket parsing. Measured next to sluice, it shows how
// much of sluice's cost per connection is Go's runtime rather than
// sluice's own work:
//
//	go run ./integration/loadtest -mode handshakes -compare 'cmd:sh integration/loadtest/peers/go.sh gotunnel,sluice'
package main

import (
	"io"
	"log"
	"net"
	"os"
	"time"
)

func main() {
	ln, err := net.Listen("tcp", os.Getenv("PROXY_LISTEN"))
	if err != nil {
		log.Fatal(err)
	}
	backend := os.Getenv("BACKEND_ADDR")
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			up, err := d.Dial("tcp", backend)
			if err != nil {
				c.Close()
				return
			}
			done := make(chan struct{})
			go func() {
				io.Copy(up, c)
				up.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(c, up)
			c.(*net.TCPConn).CloseWrite()
			<-done
			c.Close()
			up.Close()
		}()
	}
}
