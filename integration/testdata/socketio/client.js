// A Socket.IO client with the default transports (long-polling, then the
// upgrade to WebSocket): connects to the URL in argv[2], exchanges
// messages before and after the upgrade, and prints what it saw as JSON.
'use strict';
const { io } = require('socket.io-client');

const result = { hello: null, firstTransport: null, upgradedTo: null, echoes: [], serverTransport: null };
const fail = (why) => {
  process.stdout.write(JSON.stringify({ error: why, partial: result }) + '\n');
  process.exit(1);
};
setTimeout(() => fail('timeout'), 15000).unref();

const socket = io(process.argv[2], { reconnection: false, timeout: 5000 });
// The transport the engine opened with, before any upgrade.
result.firstTransport = socket.io.engine.transport && socket.io.engine.transport.name;
socket.io.engine.once('open', () => { result.firstTransport = result.firstTransport || socket.io.engine.transport.name; });
const upgraded = new Promise((resolve) => socket.io.engine.on('upgrade', (t) => resolve(t.name)));
const hello = new Promise((resolve) => socket.on('hello', resolve));
socket.on('connect_error', (e) => fail('connect_error: ' + e.message));
socket.on('connect', async () => {
  try {
    result.hello = await hello;
    for (let i = 0; i < 3; i++) {
      result.echoes.push((await socket.timeout(5000).emitWithAck('echo', 'before ' + i)).echo);
    }
    result.upgradedTo = await upgraded;
    const big = 'x'.repeat(100000);
    for (let i = 0; i < 3; i++) {
      const r = await socket.timeout(5000).emitWithAck('echo', 'after ' + i);
      result.echoes.push(r.echo);
      result.serverTransport = r.transport;
    }
    const r = await socket.timeout(5000).emitWithAck('echo', big);
    result.echoes.push(r.echo === big ? 'big ok' : 'big wrong');
    socket.disconnect();
    process.stdout.write(JSON.stringify(result) + '\n');
    process.exit(0);
  } catch (e) {
    fail(String(e));
  }
});
