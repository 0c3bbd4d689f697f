//! port-forward sessions: the simulated pod ports behind SPDY and WebSocket tunnels.

use super::*;

// === Sessions: port-forward ===

/// The pod end of a forwarded port: an echo server.
pub(super) async fn echo_port(data: spdy::Stream, error: spdy::Stream) {
    let (mut rx, tx) = data.split();
    while let Some(chunk) = rx.recv().await {
        if tx.send(chunk).await.is_err() {
            break;
        }
    }
    // Client FIN (its local connection closed) or reset: close ours, then the error stream
    // with nothing written (= success), like the kubelet's deferred Close calls.
    let _ = tx.finish().await;
    let _ = error.sender().finish().await;
}

/// Port-forward over SPDY (also used inside the WebSocket tunnel): the kubelet's
/// `httpStreamHandler`. Streams pair up by `requestID` (or the stream-id rule for clients
/// that send none) and each pair is an echo connection.
pub(super) async fn spdy_port_forward<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = spdy::serve(io, |h| {
        // httpStreamReceived: port required, 1..65535; streamType error or data.
        let port_ok = h
            .get("port")
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p > 0);
        port_ok && matches!(h.get("streamtype"), Some("error" | "data"))
    });
    let mut pending: HashMap<String, (Option<spdy::Stream>, Option<spdy::Stream>)> = HashMap::new();
    while let Some(stream) = incoming.recv().await {
        let ty = stream.headers().get("streamtype").unwrap_or("").to_owned();
        let request_id = match stream.headers().get("requestid") {
            Some(id) if !id.is_empty() => id.to_owned(),
            // No requestID: error stream id, data stream id - 2 (kubelet requestID()).
            _ if ty == "error" => stream.id().to_string(),
            _ => stream.id().saturating_sub(2).to_string(),
        };
        let entry = pending.entry(request_id.clone()).or_default();
        let slot = if ty == "error" {
            &mut entry.0
        } else {
            &mut entry.1
        };
        if slot.is_some() {
            // "error/data stream already assigned": report on the error stream if any.
            let msg = format!(
                "error processing stream for request {request_id}: {ty} stream already assigned"
            );
            if let Some(err) = &entry.0 {
                let _ = err.sender().send(Bytes::from(msg)).await;
            }
            let _ = stream.sender().reset(spdy::rst::CANCEL).await;
            continue;
        }
        *slot = Some(stream);
        let complete = entry.0.is_some() && entry.1.is_some();
        if complete {
            if let Some((Some(error), Some(data))) = pending.remove(&request_id) {
                tokio::spawn(echo_port(data, error));
            }
        }
        // A half pair that never completes stays until the session ends (the kubelet reports
        // it after streamCreationTimeout; kubectl always sends both streams back to back).
    }
    // The peer closed the connection (or sent GOAWAY and closed).
    session.go_away().await;
}

/// kubectl ≥1.31: the SPDY port-forward session inside a WebSocket, one binary message per
/// chunk of SPDY bytes in each direction (`tunneling_connection.go`).
pub(super) async fn ws_tunnel_port_forward<S>(ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (spdy_side, bridge_side) = tokio::io::duplex(256 * 1024);
    let (mut bridge_read, mut bridge_write) = tokio::io::split(bridge_side);
    let session = tokio::spawn(spdy_port_forward(spdy_side));
    // WebSocket → SPDY.
    let inbound = {
        tokio::spawn(async move {
            while let Some(msg) = source.next().await {
                match msg {
                    Ok(Message::Binary(b)) => {
                        if bridge_write.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    // The tunnel carries binary only; anything else is a protocol error.
                    Ok(Message::Text(_)) => break,
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                    Ok(Message::Close(_)) | Err(_) => break,
                }
            }
            let _ = bridge_write.shutdown().await;
            source
        })
    };
    // SPDY → WebSocket, until the SPDY session shuts its write half.
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.reserve(32 * 1024);
        match bridge_read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if sink
                    .send(Message::Binary(buf.split().freeze()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    ws_close(sink, inbound).await;
    session.abort();
}

/// Port-forward over the channel protocols (Python, client-node): per requested port i,
/// channel 2i is data (read-write) and 2i+1 the error channel (write-only); the first message
/// on each carries the port, little-endian (`handleWebSocketStreams`). Each port echoes.
pub(super) async fn ws_port_forward<S>(
    mut ws: WebSocketStream<S>,
    ports: Vec<u16>,
    proto: WsProtocol,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    for (i, port) in ports.iter().enumerate() {
        let Ok(data_ch) = u8::try_from(2 * i) else {
            break;
        };
        for ch in [data_ch, data_ch.wrapping_add(1)] {
            if ws
                .send(ws_encode(proto, ch, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let channels = ports.len() * 2;
    // No CLOSE on these protocols: a port's stream lives as long as the connection. Echoing
    // inline keeps the order of each channel's bytes.
    while let Some(msg) = ws.next().await {
        let payload = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => Bytes::from(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => break,
        };
        if let WsInput::Data(ch, data) = ws_decode(proto, &payload) {
            if usize::from(ch) < channels
                && ch % 2 == 0
                && !data.is_empty()
                && ws.send(ws_encode(proto, ch, &data)).await.is_err()
            {
                break;
            }
        }
    }
    // The peer closed (or the connection broke): answer its Close, then close the stream.
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await;
    let _ = tokio::time::timeout(WS_CLOSE_GRACE, ws.get_mut().shutdown()).await;
}
