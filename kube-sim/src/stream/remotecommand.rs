//! exec and attach sessions: the remotecommand channels over SPDY and WebSocket.

use super::*;

// === Sessions: remotecommand ===

/// Starts the process with its stdin fed from `stdin_rx`, returns its output receiver and the
/// join handle of its exit code.
pub(super) fn spawn_process(
    opts: &ExecOptions,
    pod: PodCtx,
    stdin_rx: mpsc::Receiver<Bytes>,
) -> (mpsc::Receiver<(u8, Bytes)>, tokio::task::JoinHandle<i32>) {
    let (out_tx, out_rx) = mpsc::channel(64);
    let io = ProcIo {
        stdin: stdin_rx,
        out: out_tx,
        stdout: opts.stdout,
        stderr: opts.stderr || opts.tty,
        tty: opts.tty,
        stdin_eof: !opts.stdin,
        interrupted: false,
        depth: 0,
    };
    let argv = opts.command.clone();
    let kind = opts.kind;
    let task = tokio::spawn(run_process(argv, kind, io, pod));
    (out_rx, task)
}

/// Exec/attach over SPDY, the kubelet's `createHTTPStreamStreams` + `ServeExec`.
pub(super) async fn spdy_exec<IO>(io: IO, opts: ExecOptions, version: RemoteVersion, pod: PodCtx)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = spdy::serve(io, |h| {
        // The kubelet replies to every stream and sorts them by `streamType` afterwards;
        // unknown types are dropped, which we do up front.
        matches!(
            h.get("streamtype"),
            Some("error" | "stdin" | "stdout" | "stderr" | "resize")
        )
    });
    // Expected streams: error, plus each requested one, plus resize for a TTY from v3 on.
    let expected = 1
        + usize::from(opts.stdin)
        + usize::from(opts.stdout)
        + usize::from(opts.stderr)
        + usize::from(opts.tty && version >= RemoteVersion::V3);
    let mut streams: HashMap<String, spdy::Stream> = HashMap::new();
    let mut received = 0;
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while received < expected {
        tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => {
                    let ty = s.headers().get("streamtype").unwrap_or("").to_owned();
                    streams.insert(ty, s);
                    received += 1;
                }
                None => return, // the client went away
            },
            _ = &mut deadline => {
                tracing::debug!("timed out waiting for client to create streams");
                session.go_away().await;
                return;
            }
        }
    }

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let consumes_stdin = opts.stdin && process_reads_stdin(&opts);
    let mut resets = Vec::new();
    if let Some(stdin) = streams.remove("stdin") {
        let (mut rx, tx) = stdin.split();
        resets.push(tx);
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                // A process that never reads stdin must not stall the session: discard.
                if consumes_stdin && stdin_tx.send(chunk).await.is_err() {
                    break;
                }
            }
            // Dropping stdin_tx is EOF for the process.
        });
    } else {
        drop(stdin_tx);
    }
    if let Some(resize) = streams.remove("resize") {
        let (mut rx, tx) = resize.split();
        resets.push(tx);
        // Resize events are JSON {"Width":…,"Height":…}; the simulated terminal has no size.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
    }
    let stdout = streams.remove("stdout").map(|s| s.sender());
    let stderr = streams.remove("stderr").map(|s| s.sender());
    let error = streams.remove("error").map(|s| s.sender());

    let (mut out_rx, process) = spawn_process(&opts, pod, stdin_rx);
    let abort = process.abort_handle();
    let pump = async {
        while let Some((fd, data)) = out_rx.recv().await {
            let target = if fd == 1 { &stdout } else { &stderr };
            if let Some(s) = target {
                let _ = s.send(data).await;
            }
        }
    };
    let exit = tokio::select! {
        (code, _) = async { tokio::join!(process, pump) } => match code {
            Ok(c) => Exit::Code(c),
            Err(_) => Exit::Code(126),
        },
        _ = session.closed() => Exit::Aborted,
    };
    let Exit::Code(code) = exit else {
        abort.abort();
        return;
    };
    // ServeExec's end: output streams closed, the status written, every other stream reset
    // and GOAWAY (conn.Close).
    for s in stdout.iter().chain(stderr.iter()) {
        let _ = s.finish().await;
    }
    if let Some(err) = &error {
        if let Some(bytes) = exit_status_bytes(code, version, &opts.command) {
            let _ = err.send(Bytes::from(bytes)).await;
        }
        let _ = err.finish().await;
    }
    for s in resets {
        let _ = s.reset(spdy::rst::CANCEL).await;
    }
    session.go_away().await;
    session.closed().await;
}

/// Whether the simulated command reads stdin at all (others get their stdin discarded).
pub(super) fn process_reads_stdin(opts: &ExecOptions) -> bool {
    if opts.kind == StreamKind::Attach {
        return true;
    }
    let name = opts
        .command
        .first()
        .map(|c| c.rsplit('/').next().unwrap_or(c))
        .unwrap_or("");
    matches!(
        name,
        "cat" | "tar" | "sh" | "bash" | "ash" | "dash" | "tail" | "head" | "wc"
    )
}

/// Encoding of remotecommand WebSocket messages (`wsstream.Conn`).
pub(super) fn ws_encode(proto: WsProtocol, channel: u8, data: &[u8]) -> Message {
    if proto.base64 {
        let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        text.push(char::from(b'0'.wrapping_add(channel)));
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
        Message::Text(text.into())
    } else {
        let mut frame = BytesMut::with_capacity(1 + data.len());
        frame.put_u8(channel);
        frame.extend_from_slice(data);
        Message::Binary(frame.freeze())
    }
}

/// What a client message means on a channel protocol.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WsInput {
    Data(u8, Bytes),
    /// v5 CLOSE: `[255, channel]`, half-close of that channel.
    Close(u8),
    /// Nothing to do (empty message, undecodable base64: the kubelet logs and continues).
    Ignore,
    /// A protocol error that ends the session (a malformed v5 CLOSE).
    Fatal,
}

pub(super) fn ws_decode(proto: WsProtocol, msg: &[u8]) -> WsInput {
    let Some((&first, rest)) = msg.split_first() else {
        return WsInput::Ignore;
    };
    if proto.version == RemoteVersion::V5 && first == 255 {
        return match rest {
            [channel] => WsInput::Close(*channel),
            _ => WsInput::Fatal,
        };
    }
    if proto.base64 {
        let channel = first.wrapping_sub(b'0');
        match base64::engine::general_purpose::STANDARD.decode(rest) {
            Ok(data) => WsInput::Data(channel, Bytes::from(data)),
            Err(_) => WsInput::Ignore,
        }
    } else {
        WsInput::Data(first, Bytes::copy_from_slice(rest))
    }
}

pub(super) type WsSink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
pub(super) type WsSource<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

pub(super) fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Ends a WebSocket session as `x/net/websocket`'s `Conn.Close` does for the kubelet: a Close
/// frame (1000; tungstenite turns it into the reply if the peer closed first), then, once the
/// reader saw the peer's Close or a grace period passed, the TLS stream is shut down
/// (close_notify) instead of dropped.
pub(super) async fn ws_close<S>(mut sink: WsSink<S>, reader: tokio::task::JoinHandle<WsSource<S>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // After the peer's Close, tungstenite refuses to send another but has queued the reply:
    // closing the sink flushes it.
    if sink.send(normal_close()).await.is_err() {
        let _ = sink.close().await;
    }
    let abort = reader.abort_handle();
    match tokio::time::timeout(WS_CLOSE_GRACE, reader).await {
        Ok(Ok(source)) => {
            if let Ok(mut ws) = sink.reunite(source) {
                let _ = tokio::time::timeout(WS_CLOSE_GRACE, ws.get_mut().shutdown()).await;
            }
        }
        _ => abort.abort(),
    }
}

/// Exec/attach over WebSocket: the kubelet's `createWebSocketStreams` (v1–v4) and the
/// apiserver's stream translator (v5, which alone has CLOSE).
pub(super) async fn ws_exec<S>(
    ws: WebSocketStream<S>,
    opts: ExecOptions,
    proto: WsProtocol,
    pod: PodCtx,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    // "Send an empty message to the lowest writable channel to notify the client the
    // connection is established."
    let hello = if opts.stdout {
        1
    } else if opts.stderr {
        2
    } else {
        3
    };
    if sink.send(ws_encode(proto, hello, &[])).await.is_err() {
        return;
    }

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let consumes_stdin = opts.stdin && process_reads_stdin(&opts);
    let client_gone = CancellationToken::new();
    let reader = {
        let client_gone = client_gone.clone();
        let want_stdin = opts.stdin;
        tokio::spawn(async move {
            let mut stdin_tx = Some(stdin_tx);
            while let Some(msg) = source.next().await {
                // x/net/websocket's Message.Receive into []byte takes text and binary frames
                // alike; the subprotocol alone decides the codec.
                let payload = match msg {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Text(t)) => Bytes::from(t.as_str().to_owned()),
                    // tungstenite answers pings itself while we read.
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                    Ok(Message::Close(_)) | Err(_) => break,
                };
                match ws_decode(proto, &payload) {
                    WsInput::Data(0, data) if want_stdin => {
                        if let Some(tx) = &stdin_tx {
                            if consumes_stdin && tx.send(data).await.is_err() {
                                stdin_tx = None;
                            }
                        }
                    }
                    WsInput::Close(0) => stdin_tx = None,
                    // Resize (4) is accepted and ignored; other channels are not readable.
                    WsInput::Data(..) | WsInput::Close(_) | WsInput::Ignore => {}
                    WsInput::Fatal => break,
                }
            }
            drop(stdin_tx);
            client_gone.cancel();
            source
        })
    };

    let (mut out_rx, process) = spawn_process(&opts, pod, stdin_rx);
    let abort = process.abort_handle();
    let mut send_failed = false;
    let pump = async {
        while let Some((fd, data)) = out_rx.recv().await {
            if !send_failed && sink.send(ws_encode(proto, fd, &data)).await.is_err() {
                send_failed = true;
            }
        }
    };
    let exit = tokio::select! {
        (code, _) = async { tokio::join!(process, pump) } => match code {
            Ok(c) => Exit::Code(c),
            Err(_) => Exit::Code(126),
        },
        _ = client_gone.cancelled() => Exit::Aborted,
    };
    match exit {
        Exit::Code(code) => {
            if let Some(bytes) = exit_status_bytes(code, proto.version, &opts.command) {
                let _ = sink.send(ws_encode(proto, 3, &bytes)).await;
            }
        }
        // The client closed first: stop the process, answer its Close.
        Exit::Aborted => abort.abort(),
    }
    ws_close(sink, reader).await;
}
