//! The Kubernetes manifests (deploy/kubernetes) agree with the image and the
//! binary they run: the container port is the Dockerfile's `EXPOSE` and
//! `serve --port`'s default, the probes ask `/health`, every variable set is
//! one `serve` reads, the pod runs as the Dockerfile's user, and the grace
//! period outlasts the server's shutdown deadline.
//!
//! The manifests are read as text, one `key: value` line at a time (no YAML
//! crate): enough for the flat, one-document files kept there, which
//! `scripts/validate-k8s.sh` validates against the Kubernetes schemas.

use std::path::Path;
use std::process::Command;

const DEPLOY_DIR: &str = "deploy/kubernetes";

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn manifest(name: &str) -> String {
    read(&format!("{DEPLOY_DIR}/{name}"))
}

/// A YAML line without its comment (`#` at the start or after a space,
/// outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None => {}
        }
        prev = c;
    }
    line
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(strip_comment)
        .collect::<Vec<_>>()
        .join("\n")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The value of a `key: value` line (list marker `- ` allowed), unquoted.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let line = strip_comment(line).trim();
    let line = line.strip_prefix("- ").unwrap_or(line);
    let value = line.strip_prefix(key)?.strip_prefix(':')?.trim();
    Some(value.trim_matches(|c| c == '"' || c == '\''))
}

/// Every value of `key` in `text`, in order.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines().filter_map(|l| value_of(l, key)).collect()
}

/// The one value of `key` in `text`.
fn value<'a>(text: &'a str, key: &str) -> &'a str {
    let vs = values(text, key);
    assert_eq!(vs.len(), 1, "expected one `{key}:`, found {vs:?}");
    vs[0]
}

/// The lines nested under the first `key:` line (more indented than it),
/// comments removed; empty when there is no such key.
fn block(text: &str, key: &str) -> String {
    let text = without_comments(text);
    let mut lines = text.lines();
    let Some(head) = lines.by_ref().find(|l| value_of(l, key) == Some("")) else {
        return String::new();
    };
    let depth = indent(head);
    lines
        .filter(|l| !l.trim().is_empty())
        .take_while(|l| indent(l) > depth)
        .collect::<Vec<_>>()
        .join("\n")
}

fn first_number(text: &str) -> Option<u64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The arguments of the Dockerfile's instructions named `name` (`EXPOSE`,
/// `USER`, ...), in order.
fn dockerfile_args<'a>(dockerfile: &'a str, name: &str) -> Vec<&'a str> {
    dockerfile
        .lines()
        .filter_map(|l| {
            let (instr, rest) = l.trim().split_once(char::is_whitespace)?;
            instr.eq_ignore_ascii_case(name).then_some(rest.trim())
        })
        .collect()
}

/// The uid the image runs as: its last `USER`, numeric or created by
/// `useradd --uid N name` in a `RUN`.
fn dockerfile_uid(dockerfile: &str) -> u64 {
    let user = *dockerfile_args(dockerfile, "USER")
        .last()
        .expect("the Dockerfile sets a USER");
    let user = user.split(':').next().unwrap_or(user);
    if let Ok(uid) = user.parse() {
        return uid;
    }
    let useradd = dockerfile
        .lines()
        .find(|l| l.contains("useradd") && l.split_whitespace().any(|w| w == user))
        .unwrap_or_else(|| panic!("no `useradd ... {user}` in the Dockerfile"));
    let words: Vec<&str> = useradd.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "--uid" || *w == "-u")
        .unwrap_or_else(|| panic!("`useradd` gives {user} no fixed uid: {useradd}"));
    words[at + 1].parse().expect("a numeric uid")
}

/// `gpt-serve serve --help`, run without any GPT_SERVE_* variable of the
/// test's environment (clap would print their values).
fn serve_help() -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpt-serve"));
    cmd.args(["serve", "--help"]);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GPT_SERVE_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().expect("gpt-serve runs");
    assert!(out.status.success(), "serve --help: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The help of `--flag`: its line and the lines below it up to the next
/// flag, whitespace collapsed (clap prints `[env: NAME=]` and
/// `[default: N]` on the flag's line or below it, depending on widths).
fn help_entry(help: &str, flag: &str) -> String {
    let is_flag_line = |l: &&str| l.trim_start().starts_with('-');
    let name = format!("--{flag}");
    let mut lines = help
        .lines()
        .skip_while(|l| !(is_flag_line(l) && l.split_whitespace().any(|w| w == name)));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("serve --help has no --{flag}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| !is_flag_line(l)))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `[default: N]` of `--flag` in `serve --help`.
fn help_default(help: &str, flag: &str) -> u64 {
    let entry = help_entry(help, flag);
    let default = entry
        .split_once("[default: ")
        .unwrap_or_else(|| panic!("no default shown for --{flag}: {entry}"))
        .1;
    first_number(default).unwrap_or_else(|| panic!("--{flag}'s default is not a number"))
}

/// The names the Deployment's `env:` list sets.
fn deployment_env_names(deployment: &str) -> Vec<String> {
    block(deployment, "env")
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .filter_map(|l| value_of(l, "name"))
        .map(String::from)
        .collect()
}

#[test]
fn the_deployment_port_matches_the_dockerfile_and_serve_help() {
    let deployment = manifest("deployment.yaml");
    let port: u64 = value(&deployment, "containerPort").parse().unwrap();
    let dockerfile = read("Dockerfile");
    let exposed = dockerfile_args(&dockerfile, "EXPOSE");
    assert_eq!(exposed.len(), 1, "one EXPOSE: {exposed:?}");
    assert_eq!(first_number(exposed[0]), Some(port), "Dockerfile EXPOSE");
    assert_eq!(help_default(&serve_help(), "port"), port, "serve --port");
    assert!(
        dockerfile.contains(&format!("GPT_SERVE_PORT={port}")),
        "the image's GPT_SERVE_PORT is the container port"
    );
    assert_eq!(
        value(&deployment, "prometheus.io/port"),
        port.to_string(),
        "the scrape annotation"
    );

    let ports = block(&deployment, "ports");
    let port_name = value(&ports, "name");
    let service = manifest("service.yaml");
    let target = value(&service, "targetPort");
    assert!(
        target == port.to_string() || target == port_name,
        "the Service's targetPort {target} is the container port {port} or its name {port_name}"
    );
}

#[test]
fn every_probe_asks_health_on_the_container_port() {
    let deployment = manifest("deployment.yaml");
    let ports = block(&deployment, "ports");
    let (port_name, port_number) = (value(&ports, "name"), value(&ports, "containerPort"));
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let b = block(&deployment, probe);
        if probe != "startupProbe" {
            assert!(!b.is_empty(), "the Deployment has a {probe}");
        }
        if b.is_empty() {
            continue;
        }
        assert_eq!(value(&b, "path"), "/health", "{probe}");
        let port = value(&b, "port");
        assert!(
            port == port_name || port == port_number,
            "{probe} port {port}"
        );
    }
}

#[test]
fn every_variable_the_deployment_sets_is_one_serve_reads() {
    let names = deployment_env_names(&manifest("deployment.yaml"));
    assert!(!names.is_empty(), "the Deployment sets variables");
    let help = serve_help()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for name in names {
        // `[env: NAME=value]`, or `[env: NAME]` where the value is hidden.
        assert!(
            help.contains(&format!("[env: {name}=")) || help.contains(&format!("[env: {name}]")),
            "{name} is not a variable of `gpt-serve serve --help`"
        );
    }
}

#[test]
fn the_api_key_comes_from_a_secret_through_the_variable_serve_reads() {
    let entry = help_entry(&serve_help(), "api-key");
    let api_key = entry
        .split_once("[env: ")
        .and_then(|(_, rest)| rest.split_once(['=', ']']))
        .unwrap_or_else(|| panic!("serve --help names no --api-key variable: {entry}"))
        .0;
    let env = block(&manifest("deployment.yaml"), "env");
    let entry: Vec<&str> = env
        .lines()
        .skip_while(|l| value_of(l, "name") != Some(api_key))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("- "))
        .collect();
    let entry = entry.join("\n");
    assert!(!entry.is_empty(), "the Deployment sets {api_key}");
    assert!(
        entry.contains("secretKeyRef:"),
        "{api_key} comes from a Secret, not a literal: {entry}"
    );
    assert!(values(&entry, "value").is_empty(), "no literal key");
}

#[test]
fn the_pod_runs_as_the_dockerfiles_non_root_user() {
    let deployment = manifest("deployment.yaml");
    let uid = dockerfile_uid(&read("Dockerfile"));
    assert_ne!(uid, 0, "the image runs as root");
    let run_as = values(&deployment, "runAsUser");
    assert!(!run_as.is_empty(), "the Deployment sets runAsUser");
    for u in run_as {
        assert_eq!(u.parse::<u64>().unwrap(), uid, "runAsUser");
    }
    assert_eq!(value(&deployment, "runAsNonRoot"), "true");
    assert_eq!(value(&deployment, "allowPrivilegeEscalation"), "false");
}

#[test]
fn the_grace_period_outlasts_the_prestop_sleep_and_the_shutdown_timeout() {
    let deployment = manifest("deployment.yaml");
    let grace: u64 = value(&deployment, "terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    // The Deployment's own --shutdown-timeout if it passes one, else serve's.
    let shutdown = match without_comments(&deployment).split_once("--shutdown-timeout") {
        Some((_, rest)) => first_number(rest).expect("a --shutdown-timeout value"),
        None => help_default(&serve_help(), "shutdown-timeout"),
    };
    let pre_stop = block(&deployment, "preStop");
    let sleep = match pre_stop.split_once("sleep") {
        Some((_, rest)) => first_number(rest).expect("a preStop sleep length"),
        None => 0,
    };
    assert!(
        grace > sleep + shutdown,
        "terminationGracePeriodSeconds {grace} must exceed the preStop sleep {sleep} s \
         plus --shutdown-timeout {shutdown} s, or Kubernetes kills in-flight requests"
    );
}

#[test]
fn the_autoscaler_targets_the_deployment_and_names_exported_metrics() {
    let deployment = manifest("deployment.yaml");
    let hpa = manifest("hpa.yaml");
    let target = block(&hpa, "scaleTargetRef");
    assert_eq!(value(&target, "kind"), "Deployment");
    assert_eq!(
        value(&target, "name"),
        value(&block(&deployment, "metadata"), "name")
    );

    // The queue alternative (in comments) reads the server's own gauges,
    // renamed `vllm_*` by the metrics adapter.
    let exported = read("src/serving/metrics.rs");
    for name in ["vllm:num_requests_waiting", "vllm:num_requests_running"] {
        assert!(
            exported.contains(&format!("\"{name}\"")),
            "{name} is not a metric of src/serving/metrics.rs"
        );
        assert!(hpa.contains(name), "hpa.yaml names {name}");
        assert!(
            hpa.contains(&name.replace(':', "_")),
            "and its adapter name"
        );
    }
}

#[test]
fn the_kustomization_lists_every_manifest_in_the_folder() {
    let kustomization = manifest("kustomization.yaml");
    let mut listed: Vec<String> = block(&kustomization, "resources")
        .lines()
        .filter_map(|l| strip_comment(l).trim().strip_prefix("- "))
        .map(|s| s.trim().to_string())
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEPLOY_DIR);
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    listed.sort();
    present.sort();
    assert_eq!(listed, present, "kustomization.yaml resources");
}

#[test]
fn serve_help_never_prints_the_api_key_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpt-serve"))
        .args(["serve", "--help"])
        .env("GPT_SERVE_API_KEY", "do-not-print-me")
        .output()
        .expect("gpt-serve runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(help.contains("GPT_SERVE_API_KEY"), "{help}");
    assert!(!help.contains("do-not-print-me"), "{help}");
}

#[test]
fn an_empty_api_key_from_the_flag_or_the_environment_stops_startup() {
    let absent = std::env::temp_dir().join("gpt-serve-no-model-here");
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpt-serve"));
        cmd.args(["serve", "--model", absent.to_str().unwrap(), "--port", "0"])
            .args(args)
            .env_remove("GPT_SERVE_API_KEY_FILE");
        match env {
            Some(v) => cmd.env("GPT_SERVE_API_KEY", v),
            None => cmd.env_remove("GPT_SERVE_API_KEY"),
        };
        let out = cmd.output().expect("gpt-serve runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, env) in [(&["--api-key", ""][..], None), (&[][..], Some(""))] {
        let (ok, err) = run(args, env);
        assert!(
            !ok && err.contains("--api-key") && err.contains("empty"),
            "{err}"
        );
    }
    // A key file holding nothing is refused too.
    let file = tempfile::NamedTempFile::new().unwrap();
    let (ok, err) = run(&["--api-key-file", file.path().to_str().unwrap()], None);
    assert!(!ok && err.contains("empty"), "{err}");
}
