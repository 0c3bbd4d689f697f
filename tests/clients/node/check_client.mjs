#!/usr/bin/env node
// Real-client check with @kubernetes/client-node (kube-relay integration tests).
//
// Runs, against one kubeconfig context (normally pointing at the relay):
//   1. list pods in the namespace (expects the named pod, web-0 by default) over HTTP/1.1;
//   2. `Exec` of `echo hello` over WebSocket, capturing stdout and the status channel
//      (expects stdout "hello" and status Success).
// Prints one line per check; exits 1 on the first failure with a reason, 2 on bad usage.
// Every wait is bounded: each check has its own timeout and a hard deadline covers the run.
//
// Usage: node check_client.mjs --kubeconfig K --context C [--namespace default] [--pod web-0]
//                              [--container NAME] [--timeout 20] [--deadline 90]

import { parseArgs } from 'node:util';
import { Writable } from 'node:stream';
import * as k8s from '@kubernetes/client-node';

function usage(message) {
    console.error(`check_client.mjs: ${message}`);
    console.error(
        'usage: node check_client.mjs --kubeconfig K --context C [--namespace default] ' +
            '[--pod web-0] [--container NAME] [--timeout SECONDS] [--deadline SECONDS]',
    );
    process.exit(2);
}

let args;
try {
    ({ values: args } = parseArgs({
        options: {
            kubeconfig: { type: 'string' },
            context: { type: 'string' },
            namespace: { type: 'string', default: 'default' },
            pod: { type: 'string', default: 'web-0' },
            container: { type: 'string' },
            timeout: { type: 'string', default: '20' },
            deadline: { type: 'string', default: '90' },
        },
        strict: true,
    }));
} catch (err) {
    usage(err.message);
}
if (!args.kubeconfig || !args.context) {
    usage('--kubeconfig and --context are required');
}
const timeoutMs = Number(args.timeout) * 1000;
const deadlineMs = Number(args.deadline) * 1000;
if (!(timeoutMs > 0) || !(deadlineMs > 0)) {
    usage('--timeout and --deadline must be positive numbers of seconds');
}

function fail(check, message) {
    console.log(`FAIL ${check}: ${message}`);
    process.exit(1);
}

// Hard deadline for the whole run: a hung socket must fail the test, not stall it. unref() so a
// finished run is not kept alive by this timer.
setTimeout(() => fail('deadline', `the run did not finish within ${args.deadline}s`), deadlineMs).unref();

/** Rejects with `what timed out` if `promise` does not settle within the per-check timeout. */
function bounded(promise, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} timed out after ${args.timeout}s`)), timeoutMs);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A Writable that collects everything written to it. */
function collector() {
    const chunks = [];
    const sink = new Writable({
        write(chunk, _encoding, callback) {
            chunks.push(Buffer.from(chunk));
            callback();
        },
    });
    sink.text = () => Buffer.concat(chunks).toString('utf8');
    return sink;
}

/** Best-effort readable description of client-node / fetch / WebSocket errors. */
function describe(err) {
    if (err && typeof err === 'object') {
        const parts = [];
        if (err.code !== undefined) parts.push(`code ${err.code}`);
        if (err.message) parts.push(err.message);
        if (err.body) parts.push(typeof err.body === 'string' ? err.body : JSON.stringify(err.body));
        // client-node's ApiException messages span several lines; keep one line per check.
        if (parts.length) return parts.join(': ').replace(/\s*\n\s*/g, ' | ');
    }
    return String(err);
}

const kc = new k8s.KubeConfig();
try {
    kc.loadFromFile(args.kubeconfig);
} catch (err) {
    fail('kubeconfig', `cannot load ${args.kubeconfig}: ${describe(err)}`);
}
if (!kc.getContextObject(args.context)) {
    fail('kubeconfig', `context ${JSON.stringify(args.context)} not found in ${args.kubeconfig}`);
}
kc.setCurrentContext(args.context);
const core = kc.makeApiClient(k8s.CoreV1Api);

// --- 1. list pods ---
{
    const check = 'list-pods';
    let list;
    try {
        list = await bounded(core.listNamespacedPod({ namespace: args.namespace }), 'list pods');
    } catch (err) {
        fail(check, describe(err));
    }
    const names = (list.items || []).map((pod) => pod.metadata?.name);
    if (!names.includes(args.pod)) {
        fail(check, `pod ${args.pod} not in ${args.namespace}: got ${JSON.stringify(names)}`);
    }
    console.log(`ok   ${check}: ${names.length} pods in ${args.namespace}, including ${args.pod}`);
}

// --- 2. exec echo hello ---
{
    const check = 'exec-echo';
    const stdout = collector();
    const stderr = collector();
    const exec = new k8s.Exec(kc);
    let ws;
    let statusSeen;
    // The status channel (3) carries a metav1.Status when the command ends; client-node calls the
    // callback and then closes the socket.
    const status = new Promise((resolve) => {
        statusSeen = resolve;
    });
    const closed = (socket) =>
        new Promise((resolve) => {
            if (socket.readyState === socket.CLOSED) resolve();
            socket.on('close', () => resolve());
        });
    try {
        ws = await bounded(
            exec.exec(
                args.namespace,
                args.pod,
                args.container,
                ['echo', 'hello'],
                stdout,
                stderr,
                null,
                false,
                (s) => statusSeen(s),
            ),
            'exec WebSocket handshake',
        );
        const result = await bounded(status, 'exec status');
        // Output frames precede the status frame on one ordered socket, so stdout is complete.
        if (result?.status !== 'Success') {
            fail(check, `status ${JSON.stringify(result)}; stderr ${JSON.stringify(stderr.text())}`);
        }
        if (stdout.text().trim() !== 'hello') {
            fail(check, `stdout ${JSON.stringify(stdout.text())}, expected "hello\\n"`);
        }
        // Do not wait forever for the close handshake, but do let it happen.
        await bounded(closed(ws), 'exec WebSocket close').catch(() => ws.terminate());
    } catch (err) {
        if (ws) ws.terminate();
        fail(check, describe(err));
    }
    console.log(`ok   ${check}: stdout "hello", status Success (subprotocol ${ws.protocol || 'none'})`);
}

console.log('all node client checks passed');
// Keep-alive agents or sockets may linger; the checks are done, so exit now.
process.exit(0);
