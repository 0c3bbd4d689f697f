//! tar, as `kubectl cp` runs it in the container (`tar cf -` and `tar xmf -`).

use super::*;

// === tar, as `kubectl cp` runs it ===

/// `tar cf - PATH…` (copy from the pod) and `tar [--no-same-*] -xmf - -C DIR` (copy into it):
/// the two forms kubectl's cp.go uses (with `-C` optional), in old (`cf`) or dashed (`-xmf`)
/// option style. Messages and exit codes follow GNU tar.
pub(super) async fn tar(args: &[String], io: &mut ProcIo, pod: &PodCtx) -> i32 {
    let mut mode = None;
    let mut archive = None;
    let mut dir = String::from("/");
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some(("directory", d)) => dir = join_path(&dir, d),
                Some(("file", f)) => archive = Some(f.to_owned()),
                _ => match long {
                    "extract" | "get" => mode = Some('x'),
                    "create" => mode = Some('c'),
                    // --no-same-permissions, --no-same-owner, --touch…: no effect in the sim.
                    _ => {}
                },
            }
            continue;
        }
        // The first argument may be old-style bundled options without a dash ("cf").
        let bundle = if let Some(b) = a.strip_prefix('-') {
            b
        } else if i == 1 {
            a.as_str()
        } else {
            operands.push(a.clone());
            continue;
        };
        for c in bundle.chars() {
            match c {
                'x' | 'c' | 't' => mode = Some(c),
                'f' => {
                    archive = args.get(i).cloned();
                    i += 1;
                }
                'C' => {
                    if let Some(d) = args.get(i) {
                        dir = join_path(&dir, d);
                    }
                    i += 1;
                }
                'z' | 'j' | 'J' => {
                    io.err("tar: compression is not supported by this simulator\n")
                        .await;
                    return 2;
                }
                _ => {} // m, p, o, v, …
            }
        }
    }
    if archive.as_deref().is_some_and(|f| f != "-") {
        io.err("tar: only '-' (stdin/stdout) archives are supported by this simulator\n")
            .await;
        return 2;
    }
    match mode {
        Some('c') => tar_create(&operands, &dir, io, pod).await,
        Some('x') => tar_extract(&dir, io, pod).await,
        Some('t') => tar_list(io).await,
        _ => {
            io.err("tar: You must specify one of the '-Acdtrux', '--delete' or '--test-label' options\nTry 'tar --help' or 'tar --usage' for more information.\n").await;
            2
        }
    }
}

pub(super) async fn tar_create(operands: &[String], dir: &str, io: &ProcIo, pod: &PodCtx) -> i32 {
    if operands.is_empty() {
        io.err("tar: Cowardly refusing to create an empty archive\nTry 'tar --help' or 'tar --usage' for more information.\n").await;
        return 2;
    }
    let mut stderr = String::new();
    let mut failed = false;
    let mut builder = tar::Builder::new(Vec::new());
    let mut warned = false;
    for operand in operands {
        // GNU tar keeps the operand as given, minus leading slashes (and says so once).
        let member = operand.trim_start_matches('/');
        if member.len() != operand.len() && !warned {
            stderr.push_str("tar: Removing leading `/' from member names\n");
            warned = true;
        }
        let path = join_path(dir, operand);
        let entries = pod
            .files
            .with(&pod.namespace, &pod.pod, |fs| fs.walk(&path));
        if entries.is_empty() {
            stderr.push_str(&format!(
                "tar: {operand}: Cannot stat: No such file or directory\n"
            ));
            failed = true;
            continue;
        }
        let member = member.trim_end_matches('/');
        for (p, node) in entries {
            let rel = &p[path.len()..];
            let mut name = if member.is_empty() {
                rel.trim_start_matches('/').to_owned()
            } else {
                format!("{member}{rel}")
            };
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            let _ = header.set_username("root");
            let _ = header.set_groupname("root");
            let result = match node {
                Node::Dir { mtime } => {
                    if name.is_empty() {
                        continue;
                    }
                    name.push('/');
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_mtime(mtime);
                    header.set_size(0);
                    builder.append_data(&mut header, &name, std::io::empty())
                }
                Node::File { data, mode, mtime } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(mode);
                    header.set_mtime(mtime);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, &name, &data[..])
                }
            };
            if let Err(e) = result {
                stderr.push_str(&format!("tar: {name}: {e}\n"));
                failed = true;
            }
        }
    }
    let archive = builder.into_inner().unwrap_or_default();
    if !stderr.is_empty() {
        io.err(stderr).await;
    }
    io.out(archive).await;
    if failed {
        io.err("tar: Exiting with failure status due to previous errors\n")
            .await;
        2
    } else {
        0
    }
}

/// One member read from an archive on stdin.
pub(super) enum Member {
    Dir(String),
    File(String, Vec<u8>, u32),
    Skipped(String, &'static str),
}

pub(super) fn read_archive(data: &[u8]) -> Result<Vec<Member>, String> {
    let mut archive = tar::Archive::new(data);
    let entries = archive
        .entries()
        .map_err(|_| "This does not look like a tar archive".to_owned())?;
    let mut members = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("Skipping to next header: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("invalid member name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let name = raw.trim_start_matches('/').trim_end_matches('/').to_owned();
        if name.split('/').any(|c| c == "..") {
            members.push(Member::Skipped(raw, "Member name contains '..'"));
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => members.push(Member::Dir(name)),
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mode = entry.header().mode().unwrap_or(0o644);
                let mut content = Vec::new();
                entry
                    .read_to_end(&mut content)
                    .map_err(|e| format!("{name}: {e}"))?;
                members.push(Member::File(name, content, mode));
            }
            _ => members.push(Member::Skipped(
                name,
                "links and special files are not supported by this simulator",
            )),
        }
    }
    Ok(members)
}

pub(super) async fn tar_extract(dir: &str, io: &mut ProcIo, pod: &PodCtx) -> i32 {
    let dir_exists = pod
        .files
        .with(&pod.namespace, &pod.pod, |fs| fs.is_dir(dir));
    if !dir_exists {
        // GNU tar checks -C before reading the archive.
        io.err(format!(
            "tar: {dir}: Cannot open: No such file or directory\ntar: Error is not recoverable: exiting now\n"
        ))
        .await;
        return 2;
    }
    let Ok(data) = io.read_all(MAX_TAR_INPUT).await else {
        io.err("tar: write error: No space left on device\n").await;
        return 2;
    };
    if data.is_empty() {
        return 0;
    }
    let members = match read_archive(&data) {
        Ok(m) => m,
        Err(e) => {
            io.err(format!(
                "tar: {e}\ntar: Exiting with failure status due to previous errors\n"
            ))
            .await;
            return 2;
        }
    };
    let mut stderr = String::new();
    pod.files.with(&pod.namespace, &pod.pod, |fs| {
        for m in members {
            match m {
                Member::Dir(name) => {
                    if let Err(e) = fs.mkdir_all(&join_path(dir, &name)) {
                        stderr.push_str(&format!("tar: {name}: Cannot mkdir: {e}\n"));
                    }
                }
                Member::File(name, content, mode) => {
                    let path = join_path(dir, &name);
                    if fs.is_dir(&path) {
                        stderr.push_str(&format!("tar: {name}: Cannot open: Is a directory\n"));
                    } else {
                        fs.write(&path, Bytes::from(content), mode);
                    }
                }
                Member::Skipped(name, why) => {
                    stderr.push_str(&format!("tar: {name}: {why}\n"));
                }
            }
        }
    });
    if stderr.is_empty() {
        0
    } else {
        io.err(stderr).await;
        io.err("tar: Exiting with failure status due to previous errors\n")
            .await;
        2
    }
}

pub(super) async fn tar_list(io: &mut ProcIo) -> i32 {
    let Ok(data) = io.read_all(MAX_TAR_INPUT).await else {
        return 2;
    };
    match read_archive(&data) {
        Ok(members) => {
            let mut out = String::new();
            for m in members {
                match m {
                    Member::Dir(n) => out.push_str(&format!("{n}/\n")),
                    Member::File(n, ..) | Member::Skipped(n, _) => {
                        out.push_str(&n);
                        out.push('\n');
                    }
                }
            }
            io.out(out).await;
            0
        }
        Err(e) => {
            io.err(format!("tar: {e}\n")).await;
            2
        }
    }
}
