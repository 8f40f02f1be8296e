//! Several "hosts" on one machine: each a network namespace with its own
//! address on a private subnet, all wired to one bridge (the "switch", in a
//! namespace of its own) by veth pairs. A host's link can be cut without
//! closing its sockets: its peers see silence, never a reset, as when a
//! node drops off the network.
//!
//! Needs root and `ip`. Where namespaces cannot be made, [`Hosts::new`]
//! says why and the test skips, loudly; with `DALLE_REQUIRE_NETNS=1` (CI)
//! it fails instead.
// Each test binary uses its own part of these.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Hosts {
    switch: String,
    names: Vec<String>,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// `n` hosts, or `None` (after saying why) where namespaces are not
    /// available.
    pub fn new(n: usize) -> Option<Self> {
        match Self::build(n) {
            Ok(hosts) => Some(hosts),
            Err(why) if std::env::var_os("DALLE_REQUIRE_NETNS").is_some() => {
                panic!("network namespaces are required (DALLE_REQUIRE_NETNS) but: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: this test needs network namespaces (root and `ip`): {why}");
                None
            }
        }
    }

    fn build(n: usize) -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Every set of hosts has a bridge of its own: the subnets of two sets
        // never meet, so they may be the same.
        let mut hosts = Hosts {
            switch: format!("dsw{id}"),
            names: Vec::new(),
            subnet: "10.201.0".into(),
        };
        ip(&["netns", "add", &hosts.switch])?;
        ip(&["-n", &hosts.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hosts.switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let name = format!("dh{i}n{id}");
            ip(&["netns", "add", &name])?;
            hosts.names.push(name.clone());
            let (inside, outside) = (format!("e{i}"), format!("p{i}"));
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &name,
                "link",
                "add",
                &inside,
                "type",
                "veth",
                "peer",
                "name",
                &outside,
                "netns",
                &hosts.switch,
            ])?;
            ip(&[
                "-n",
                &hosts.switch,
                "link",
                "set",
                &outside,
                "master",
                "br0",
            ])?;
            ip(&["-n", &hosts.switch, "link", "set", &outside, "up"])?;
            let address = format!("{}/24", hosts.address(i));
            ip(&["-n", &name, "addr", "add", &address, "dev", &inside])?;
            ip(&["-n", &name, "link", "set", &inside, "up"])?;
        }
        Ok(hosts)
    }

    /// Host `i`'s address.
    pub fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// A command that runs `program` on host `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.names[i], program]);
        command
    }

    /// Cuts host `i` off (its switch port goes down): packets to and from
    /// it are dropped, its sockets stay open, nobody gets a reset.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "down"]).unwrap();
    }

    /// Wires host `i` back.
    pub fn mend(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "up"]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in self.names.iter().chain(std::iter::once(&self.switch)) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
