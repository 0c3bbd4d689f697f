//! The simulated processes a session runs (`cat`, `echo`, `env`, `gen`, `sleep` ...).

use super::*;

// === Processes ===

/// The pod a process runs in.
#[derive(Clone)]
pub(super) struct PodCtx {
    pub(super) namespace: String,
    pub(super) pod: String,
    pub(super) files: PodFiles,
}

/// Output of a process, in order: (1 = stdout, 2 = stderr, bytes).
pub(super) type OutTx = mpsc::Sender<(u8, Bytes)>;

/// A simulated process's standard streams. Stdin ends (returns `None`) at the client's EOF.
pub(super) struct ProcIo {
    pub(super) stdin: mpsc::Receiver<Bytes>,
    pub(super) out: OutTx,
    pub(super) stdout: bool,
    pub(super) stderr: bool,
    /// A terminal: stderr joins stdout, output `\n` becomes `\r\n` (ONLCR), input `\r` becomes
    /// `\n` (ICRNL), ^D at any point ends input and ^C interrupts (a much reduced line
    /// discipline: no echo, no line editing).
    pub(super) tty: bool,
    pub(super) stdin_eof: bool,
    pub(super) interrupted: bool,
    /// How many shells deep this process is (see [`MAX_SHELL_DEPTH`]).
    pub(super) depth: u32,
}

/// Nested `sh` invocations allowed in one exec.
pub(super) const MAX_SHELL_DEPTH: u32 = 16;

impl ProcIo {
    pub(super) async fn write(&self, fd: u8, data: impl Into<Bytes>) {
        let mut data: Bytes = data.into();
        let fd = if self.tty { 1 } else { fd };
        let wanted = if fd == 1 { self.stdout } else { self.stderr };
        if !wanted || data.is_empty() {
            return;
        }
        if self.tty && data.contains(&b'\n') {
            let mut crlf = BytesMut::with_capacity(data.len() + data.len() / 8);
            for &b in data.iter() {
                if b == b'\n' {
                    crlf.put_u8(b'\r');
                }
                crlf.put_u8(b);
            }
            data = crlf.freeze();
        }
        // A closed output means the session is ending; the process just stops being heard.
        let _ = self.out.send((fd, data)).await;
    }

    pub(super) async fn out(&self, data: impl Into<Bytes>) {
        self.write(1, data).await
    }

    pub(super) async fn err(&self, data: impl Into<Bytes>) {
        self.write(2, data).await
    }

    pub(super) async fn read(&mut self) -> Option<Bytes> {
        if self.stdin_eof {
            return None;
        }
        let Some(chunk) = self.stdin.recv().await else {
            self.stdin_eof = true;
            return None;
        };
        if !self.tty {
            return Some(chunk);
        }
        let mut data = BytesMut::with_capacity(chunk.len());
        for &b in chunk.iter() {
            match b {
                0x04 => {
                    self.stdin_eof = true;
                    break;
                }
                0x03 => {
                    self.interrupted = true;
                    self.stdin_eof = true;
                    break;
                }
                b'\r' => data.put_u8(b'\n'),
                b => data.put_u8(b),
            }
        }
        Some(data.freeze())
    }

    pub(super) async fn read_all(&mut self, limit: usize) -> Result<Vec<u8>, ()> {
        let mut all = Vec::new();
        while let Some(chunk) = self.read().await {
            if all.len() + chunk.len() > limit {
                return Err(());
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// Same outputs and terminal, other stdin: for pipeline stages and scripts.
    pub(super) fn with_stdin(&self, stdin: mpsc::Receiver<Bytes>, out: OutTx) -> ProcIo {
        ProcIo {
            stdin,
            out,
            stdout: true,
            stderr: self.stderr,
            tty: self.tty,
            stdin_eof: false,
            interrupted: false,
            depth: self.depth,
        }
    }
}

/// A stdin that is already at EOF.
pub(super) fn closed_stdin() -> mpsc::Receiver<Bytes> {
    mpsc::channel(1).1
}

pub(super) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs the container's side of an exec (argv) or attach (argv empty).
pub(super) async fn run_process(
    argv: Vec<String>,
    kind: StreamKind,
    mut io: ProcIo,
    pod: PodCtx,
) -> i32 {
    if kind == StreamKind::Attach {
        // The main process of the simulated container echoes its stdin, like `cat`. Without
        // stdin it runs on, silent, until the client detaches (as attaching to a server does).
        if io.stdin_eof {
            std::future::pending::<()>().await;
        }
        return cat(&mut io).await;
    }
    run_argv(&argv, &mut io, &pod).await.code()
}

/// Result of running a command inside the mini shell: `exit` must stop the whole script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Status(i32),
    Exit(i32),
}

impl Flow {
    pub(super) fn code(self) -> i32 {
        match self {
            Flow::Status(c) | Flow::Exit(c) => c,
        }
    }
}

pub(super) fn run_argv<'a>(
    argv: &'a [String],
    io: &'a mut ProcIo,
    pod: &'a PodCtx,
) -> BoxFut<'a, Flow> {
    Box::pin(async move {
        match parse_redirects(argv) {
            Ok(Some((argv, redirects))) => return run_redirected(&argv, redirects, io, pod).await,
            Ok(None) => {}
            Err(e) => {
                io.err(format!("sh: 1: {e}\n")).await;
                return Flow::Status(2);
            }
        }
        let Some(first) = argv.first() else {
            return Flow::Status(0);
        };
        let name = first.rsplit('/').next().unwrap_or(first).to_owned();
        let args = &argv[1..];
        let code = match name.as_str() {
            "exit" => {
                return Flow::Exit(args.first().and_then(|a| a.parse().ok()).unwrap_or(0) & 0xff)
            }
            "true" | ":" => 0,
            "false" => 1,
            "echo" => {
                let (newline, words) = match args.first().map(String::as_str) {
                    Some("-n") => (false, &args[1..]),
                    _ => (true, args),
                };
                let mut line = words.join(" ");
                if newline {
                    line.push('\n');
                }
                io.out(line).await;
                0
            }
            "cat" => {
                if args.is_empty() || args.iter().all(|a| a == "-") {
                    cat(io).await
                } else {
                    let mut code = 0;
                    for a in args {
                        let path = normalize(a);
                        let got = pod.files.with(&pod.namespace, &pod.pod, |fs| {
                            match fs.nodes.get(&path) {
                                Some(Node::File { data, .. }) => Ok(data.clone()),
                                Some(Node::Dir { .. }) => Err("Is a directory"),
                                None => Err("No such file or directory"),
                            }
                        });
                        match got {
                            Ok(data) => io.out(data).await,
                            Err(why) => {
                                io.err(format!("cat: {a}: {why}\n")).await;
                                code = 1;
                            }
                        }
                    }
                    code
                }
            }
            "env" | "printenv" => {
                let mut env = String::from(
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
                );
                env.push_str(&format!("HOSTNAME={}\n", pod.pod));
                if io.tty {
                    env.push_str("TERM=xterm\n");
                }
                env.push_str("KUBERNETES_SERVICE_HOST=10.96.0.1\n");
                env.push_str("KUBERNETES_SERVICE_PORT=443\n");
                env.push_str("KUBERNETES_PORT=tcp://10.96.0.1:443\n");
                env.push_str("HOME=/root\n");
                io.out(env).await;
                0
            }
            "hostname" => {
                io.out(format!("{}\n", pod.pod)).await;
                0
            }
            "sleep" => {
                let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(-1.0);
                if !(0.0..=1e7).contains(&secs) {
                    io.err("sleep: invalid time interval\n").await;
                    1
                } else {
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    0
                }
            }
            "gen" => match args.first().and_then(|a| parse_size(a)) {
                Some(n) => {
                    gen(io, n).await;
                    0
                }
                None => {
                    io.err("gen: usage: gen BYTES\n").await;
                    2
                }
            },
            "test" | "[" => {
                let args: Vec<&str> = args
                    .iter()
                    .map(String::as_str)
                    .filter(|a| !(name == "[" && *a == "]"))
                    .collect();
                test(&args, pod)
            }
            "ls" => ls(args, io, pod).await,
            "mkdir" => {
                let mut code = 0;
                for a in args.iter().filter(|a| !a.starts_with('-')) {
                    let path = normalize(a);
                    if let Err(e) = pod
                        .files
                        .with(&pod.namespace, &pod.pod, |fs| fs.mkdir_all(&path))
                    {
                        io.err(format!("mkdir: cannot create directory '{a}': {e}\n"))
                            .await;
                        code = 1;
                    }
                }
                code
            }
            "tar" => tar(args, io, pod).await,
            "tail" | "head" | "wc" => filter(&name, args, io).await,
            "sh" | "bash" | "ash" | "dash" => {
                // Each nested shell adds a level of (boxed) futures; bound it so a script or an
                // interactive stdin full of `sh` lines cannot exhaust the stack.
                if io.depth >= MAX_SHELL_DEPTH {
                    io.err("sh: too many nested shells\n").await;
                    return Flow::Status(2);
                }
                io.depth += 1;
                let flow = shell(args, io, pod).await;
                io.depth -= 1;
                return flow;
            }
            _ => {
                io.err(format!("sh: 1: {first}: not found\n")).await;
                127
            }
        };
        Flow::Status(code)
    })
}

/// Where a redirected descriptor goes (`>&2`, `2>&1`, `>/dev/null`, `> FILE`, `>> FILE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Redirect {
    Fd(u8),
    Null,
    File { path: String, append: bool },
}

/// The redirections for stdout and stderr, and `< FILE` for stdin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Redirects {
    pub(super) out: [Option<Redirect>; 2],
    pub(super) stdin: Option<String>,
}

/// Splits shell redirections off `argv`; `None` when there are none.
pub(super) fn parse_redirects(argv: &[String]) -> Result<Option<(Vec<String>, Redirects)>, String> {
    let mut words = Vec::new();
    let mut r = Redirects::default();
    let mut found = false;
    let mut it = argv.iter();
    while let Some(w) = it.next() {
        let (fd, rest) = match w.as_bytes() {
            [b'1' | b'2', b'>', ..] => (usize::from(w.as_bytes()[0] - b'1'), &w[1..]),
            [b'>', ..] => (0, &w[..]),
            [b'<', ..] => {
                found = true;
                let target = if w.len() > 1 {
                    Some(w[1..].to_owned())
                } else {
                    it.next().cloned()
                };
                r.stdin = Some(target.ok_or("Syntax error: newline unexpected")?);
                continue;
            }
            _ => {
                words.push(w.clone());
                continue;
            }
        };
        found = true;
        let (append, target) = match rest.strip_prefix(">>") {
            Some(t) => (true, t),
            None => (false, rest.strip_prefix('>').unwrap_or(rest)),
        };
        let target = if target.is_empty() {
            it.next()
                .cloned()
                .ok_or("Syntax error: newline unexpected")?
        } else {
            target.to_owned()
        };
        r.out[fd] = Some(match target.as_str() {
            "&1" => Redirect::Fd(1),
            "&2" => Redirect::Fd(2),
            "/dev/null" => Redirect::Null,
            t if t.starts_with('&') => return Err(format!("{t}: bad file descriptor")),
            t => Redirect::File {
                path: t.to_owned(),
                append,
            },
        });
    }
    Ok(found.then_some((words, r)))
}

/// Runs `argv` with its outputs (and maybe stdin) redirected.
pub(super) async fn run_redirected(
    argv: &[String],
    redirects: Redirects,
    io: &mut ProcIo,
    pod: &PodCtx,
) -> Flow {
    let file_input = match &redirects.stdin {
        Some(path) => {
            let path = normalize(path);
            let data = pod
                .files
                .with(&pod.namespace, &pod.pod, |fs| match fs.nodes.get(&path) {
                    Some(Node::File { data, .. }) => Some(data.clone()),
                    _ => None,
                });
            match data {
                Some(d) => Some(d),
                None => {
                    io.err(format!(
                        "sh: 1: cannot open {}: No such file\n",
                        redirects.stdin.as_deref().unwrap_or("")
                    ))
                    .await;
                    return Flow::Status(2);
                }
            }
        }
        None => None,
    };
    let stdin = match file_input {
        Some(data) => {
            let (tx, rx) = mpsc::channel(1);
            if !data.is_empty() {
                let _ = tx.try_send(data);
            }
            rx
        }
        None => std::mem::replace(&mut io.stdin, closed_stdin()),
    };
    let (tx, mut rx) = mpsc::channel::<(u8, Bytes)>(16);
    let mut inner = io.with_stdin(stdin, tx);
    inner.stdout = true;
    inner.stderr = true;
    let outer = io.out.clone();
    let (stdout_wanted, stderr_wanted) = (io.stdout, io.stderr);
    let targets = redirects.out.clone();
    let collect = async move {
        let mut files: Vec<(String, bool, Vec<u8>)> = Vec::new();
        while let Some((fd, data)) = rx.recv().await {
            let idx = usize::from(fd.saturating_sub(1).min(1));
            let dest = match &targets[idx] {
                None => Redirect::Fd(fd),
                Some(d) => d.clone(),
            };
            match dest {
                Redirect::Fd(n) => {
                    let wanted = if n == 1 { stdout_wanted } else { stderr_wanted };
                    if wanted {
                        let _ = outer.send((n, data)).await;
                    }
                }
                Redirect::Null => {}
                Redirect::File { path, append } => {
                    match files.iter_mut().find(|(p, _, _)| *p == path) {
                        Some((_, _, buf)) => buf.extend_from_slice(&data),
                        None => files.push((path, append, data.to_vec())),
                    }
                }
            }
        }
        files
    };
    let run = async move {
        let f = run_argv(argv, &mut inner, pod).await;
        let stdin = std::mem::replace(&mut inner.stdin, closed_stdin());
        drop(inner);
        (f, stdin)
    };
    let ((flow, stdin), files) = tokio::join!(run, collect);
    if redirects.stdin.is_none() {
        io.stdin = stdin;
    }
    // `> FILE` creates the file even when nothing was written.
    let mut files = files;
    for r in redirects.out.iter().flatten() {
        if let Redirect::File { path, append } = r {
            if !files.iter().any(|(p, _, _)| p == path) {
                files.push((path.clone(), *append, Vec::new()));
            }
        }
    }
    pod.files.with(&pod.namespace, &pod.pod, |fs| {
        for (path, append, data) in files {
            let path = normalize(&path);
            let mut content = Vec::new();
            if append {
                if let Some(Node::File { data: old, .. }) = fs.nodes.get(&path) {
                    content.extend_from_slice(old);
                }
            }
            content.extend_from_slice(&data);
            fs.write(&path, Bytes::from(content), 0o644);
        }
    });
    flow
}

/// `cat` of stdin (also the attach target). ^C on a terminal ends it like SIGINT (130).
pub(super) async fn cat(io: &mut ProcIo) -> i32 {
    while let Some(chunk) = io.read().await {
        io.out(chunk).await;
    }
    if io.interrupted {
        130
    } else {
        0
    }
}

/// The `gen` pattern: printable and position-dependent, so a test can check every byte.
pub const GEN_PATTERN: &[u8; 64] =
    b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";

/// Writes `n` bytes of [`GEN_PATTERN`] repeated (byte i is `GEN_PATTERN[i % 64]`).
pub(super) async fn gen(io: &ProcIo, n: u64) {
    const CHUNK: usize = 64 * 1024;
    let block: Bytes = GEN_PATTERN.iter().copied().cycle().take(CHUNK).collect();
    let mut left = n;
    while left > 0 {
        let take = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        io.out(block.slice(..take)).await;
        left -= take as u64;
        if io.out.is_closed() {
            return;
        }
    }
}

pub(super) fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

pub(super) fn test(args: &[&str], pod: &PodCtx) -> i32 {
    if args.first() == Some(&"!") {
        // `test ! EXPR` negates (not recursive: any number of `!` is fine).
        let negations = args.iter().take_while(|a| **a == "!").count();
        let code = test(&args[negations..], pod);
        return if code > 1 || negations % 2 == 0 {
            code
        } else {
            1 - code
        };
    }
    let ok = match args {
        [] => false,
        [s] => !s.is_empty(),
        [op, path] => {
            let path = normalize(path);
            pod.files.with(&pod.namespace, &pod.pod, |fs| match *op {
                "-d" => fs.is_dir(&path),
                "-f" => matches!(fs.nodes.get(&path), Some(Node::File { .. })),
                "-e" => fs.exists(&path),
                "-s" => {
                    matches!(fs.nodes.get(&path), Some(Node::File { data, .. }) if !data.is_empty())
                }
                "-n" => !path.is_empty(),
                _ => false,
            })
        }
        [a, "=", b] => a == b,
        [a, "!=", b] => a != b,
        _ => return 2,
    };
    i32::from(!ok)
}

pub(super) async fn ls(args: &[String], io: &ProcIo, pod: &PodCtx) -> i32 {
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let paths: Vec<String> = if paths.is_empty() {
        vec!["/".to_owned()]
    } else {
        paths.into_iter().cloned().collect()
    };
    let mut code = 0;
    for p in paths {
        let path = normalize(&p);
        let listing = pod
            .files
            .with(&pod.namespace, &pod.pod, |fs| match fs.nodes.get(&path) {
                Some(Node::Dir { .. }) => Some(fs.children(&path)),
                Some(Node::File { .. }) => Some(vec![p.clone()]),
                None => None,
            });
        match listing {
            Some(names) => {
                let mut text = names.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                io.out(text).await;
            }
            None => {
                io.err(format!(
                    "ls: cannot access '{p}': No such file or directory\n"
                ))
                .await;
                code = 2;
            }
        }
    }
    code
}

/// The few filters pipelines need: `tail -c +N`, `tail -c N`, `head -c N`, `wc -c`.
pub(super) async fn filter(name: &str, args: &[String], io: &mut ProcIo) -> i32 {
    let Ok(input) = io.read_all(MAX_TAR_INPUT).await else {
        io.err(format!("{name}: input too large\n")).await;
        return 1;
    };
    // Accept "-c+N", "-c +N", "-cN", "-c N".
    let joined = args.join(" ");
    let spec = joined.trim_start_matches("-c").trim().to_owned();
    let output = match name {
        "wc" => format!("{}\n", input.len()).into_bytes(),
        "tail" => {
            if let Some(from) = spec.strip_prefix('+').and_then(|n| n.parse::<usize>().ok()) {
                // tail -c +N: output starting with byte N (1-based).
                input
                    .get(from.saturating_sub(1)..)
                    .unwrap_or_default()
                    .to_vec()
            } else if let Ok(n) = spec.parse::<usize>() {
                input[input.len().saturating_sub(n)..].to_vec()
            } else {
                input
            }
        }
        _ => match spec.parse::<usize>() {
            Ok(n) => input[..n.min(input.len())].to_vec(),
            Err(_) => input,
        },
    };
    io.out(output).await;
    0
}
