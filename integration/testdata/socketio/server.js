// An ordinary Node app serving everything on one port, as apps do: a
// Socket.IO server (default transports: long-polling first, then the
// upgrade to WebSocket), an SSE stream, a POST echo, an 8 MiB download
// and a health check. sluice's integration/socketio_test.go runs it on
// 127.0.0.1 and prints {"port": N} on stdout once it listens.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const downloadSize = 8 * 1024 * 1024 + 7;
const download = Buffer.alloc(downloadSize);
for (let i = 0; i < downloadSize; i++) download[i] = (i * 7 + (i >> 8)) & 0xff;

// SSE: event 1 at once, each next one when /sse-next is requested, three
// in all; a test can so tell an event held by a proxy from one not sent.
let sseWaiters = [];

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok');
  } else if (path === '/echo' && req.method === 'POST') {
    res.writeHead(200, { 'content-type': req.headers['content-type'] || 'application/octet-stream' });
    req.pipe(res);
  } else if (path === '/download') {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': downloadSize });
    res.end(download);
  } else if (path === '/sse') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let n = 1;
    res.write(`data: event ${n}\n\n`);
    const next = () => {
      n++;
      res.write(`data: event ${n}\n\n`);
      if (n === 3) res.end(); else sseWaiters.push(next);
    };
    sseWaiters.push(next);
    req.on('close', () => { sseWaiters = sseWaiters.filter((f) => f !== next); });
  } else if (path === '/sse-next') {
    const waiting = sseWaiters;
    sseWaiters = [];
    waiting.forEach((f) => f());
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(String(waiting.length));
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  }
});

const io = new Server(server);
io.on('connection', (socket) => {
  socket.emit('hello', 'welcome');
  socket.on('echo', (msg, ack) => ack({ echo: msg, transport: socket.conn.transport.name }));
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
