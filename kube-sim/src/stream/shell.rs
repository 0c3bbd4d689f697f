//! The mini shell behind `sh -c`: just enough for the commands kubectl and the tests send.

use super::*;

// === The mini shell (`sh -c`) ===

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Token {
    Word(String),
    /// `;`, newline, `&&`, `||`, `|`
    Op(&'static str),
}

/// Splits a script into words and operators, honouring '…', "…" and backslashes.
pub(super) fn tokenize(script: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let flush = |tokens: &mut Vec<Token>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            tokens.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err("Syntax error: Unterminated quoted string".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err("Syntax error: Unterminated quoted string".into()),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err("Syntax error: Unterminated quoted string".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    if ch != '\n' {
                        word.push(ch);
                    }
                }
            }
            ' ' | '\t' => flush(&mut tokens, &mut word, &mut in_word),
            ';' | '\n' => {
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op(";"));
            }
            '&' if chars.peek() == Some(&'&') => {
                chars.next();
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("&&"));
            }
            '|' if chars.peek() == Some(&'|') => {
                chars.next();
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("||"));
            }
            '|' => {
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("|"));
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                for ch in chars.by_ref() {
                    if ch == '\n' {
                        tokens.push(Token::Op(";"));
                        break;
                    }
                }
            }
            ch => {
                in_word = true;
                word.push(ch);
            }
        }
    }
    flush(&mut tokens, &mut word, &mut in_word);
    Ok(tokens)
}

/// `sh -c SCRIPT`, or an interactive `sh` reading commands from stdin line by line.
pub(super) async fn shell(args: &[String], io: &mut ProcIo, pod: &PodCtx) -> Flow {
    if let Some(pos) = args.iter().position(|a| a == "-c") {
        let Some(script) = args.get(pos + 1) else {
            io.err("sh: 0: -c requires an argument\n").await;
            return Flow::Status(2);
        };
        return Flow::Status(run_script(script, io, pod).await.code());
    }
    // Interactive: one line at a time, `exit` ends it.
    let mut pending = Vec::new();
    let mut last = 0;
    loop {
        if io.tty {
            io.out("# ").await;
        }
        let line = loop {
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(i + 1);
                break Some(std::mem::replace(&mut pending, rest));
            }
            match io.read().await {
                Some(chunk) => pending.extend_from_slice(&chunk),
                None if pending.is_empty() => break None,
                None => break Some(std::mem::take(&mut pending)),
            }
        };
        let Some(line) = line else {
            return Flow::Status(if io.interrupted { 130 } else { last });
        };
        match run_script(&String::from_utf8_lossy(&line), io, pod).await {
            Flow::Exit(c) => return Flow::Status(c),
            Flow::Status(c) => last = c,
        }
    }
}

pub(super) fn run_script<'a>(
    script: &'a str,
    io: &'a mut ProcIo,
    pod: &'a PodCtx,
) -> BoxFut<'a, Flow> {
    Box::pin(async move {
        let tokens = match tokenize(script) {
            Ok(t) => t,
            Err(e) => {
                io.err(format!("sh: 1: {e}\n")).await;
                return Flow::Status(2);
            }
        };
        // Split into pipelines joined by ; && ||.
        let mut last = 0;
        let mut connector = ";";
        let mut pipeline: Vec<Vec<String>> = vec![Vec::new()];
        let mut items: Vec<(&'static str, Vec<Vec<String>>)> = Vec::new();
        for t in tokens {
            match t {
                Token::Word(w) => {
                    if let Some(cmd) = pipeline.last_mut() {
                        cmd.push(w);
                    }
                }
                Token::Op("|") => pipeline.push(Vec::new()),
                Token::Op(op) => {
                    items.push((
                        connector,
                        std::mem::replace(&mut pipeline, vec![Vec::new()]),
                    ));
                    connector = op;
                }
            }
        }
        items.push((connector, pipeline));
        for (connector, stages) in items {
            let stages: Vec<Vec<String>> = stages.into_iter().filter(|s| !s.is_empty()).collect();
            if stages.is_empty() {
                continue;
            }
            let skip = match connector {
                "&&" => last != 0,
                "||" => last == 0,
                _ => false,
            };
            if skip {
                continue;
            }
            match run_pipeline(&stages, io, pod).await {
                Flow::Exit(c) => return Flow::Exit(c),
                Flow::Status(c) => last = c,
            }
        }
        Flow::Status(last)
    })
}

/// Runs `a | b | c`: each stage's stdout is buffered and fed to the next (fine for the small
/// pipelines `kubectl cp --retries` uses). The first stage reads the real stdin, the last
/// writes the real stdout; stderr always goes straight out.
pub(super) async fn run_pipeline(stages: &[Vec<String>], io: &mut ProcIo, pod: &PodCtx) -> Flow {
    if stages.len() == 1 {
        return run_argv(&stages[0], io, pod).await;
    }
    let mut input: Option<Vec<u8>> = None;
    let mut flow = Flow::Status(0);
    for (i, argv) in stages.iter().enumerate() {
        let last = i + 1 == stages.len();
        let stdin = match input.take() {
            None => std::mem::replace(&mut io.stdin, closed_stdin()),
            Some(data) => {
                let (tx, rx) = mpsc::channel(1);
                if !data.is_empty() {
                    let _ = tx.try_send(Bytes::from(data));
                }
                rx
            }
        };
        let first = i == 0;
        if last {
            let mut stage = io.with_stdin(stdin, io.out.clone());
            stage.stdout = io.stdout;
            flow = run_argv(argv, &mut stage, pod).await;
        } else {
            let (tx, mut rx) = mpsc::channel::<(u8, Bytes)>(16);
            let mut stage = io.with_stdin(stdin, tx);
            let outer = io.out.clone();
            let collect = async move {
                let mut buf = Vec::new();
                while let Some((fd, data)) = rx.recv().await {
                    if fd == 1 {
                        buf.extend_from_slice(&data);
                    } else {
                        let _ = outer.send((fd, data)).await;
                    }
                }
                buf
            };
            let run = async move {
                let f = run_argv(argv, &mut stage, pod).await;
                drop(stage);
                f
            };
            let (f, buf) = tokio::join!(run, collect);
            if let Flow::Exit(_) = f {
                return f;
            }
            input = Some(buf);
        }
        if first {
            // The real stdin was consumed by the first stage; later reads see EOF.
            io.stdin_eof = true;
        }
    }
    flow
}
