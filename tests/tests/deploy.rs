//! deploy/ is checked against the binaries it deploys: every Kustomize
//! overlay is rendered offline (`kubectl kustomize`) and every object must deserialize into its
//! k8s-openapi type; every flag, environment variable and config-file key
//! the manifests and the systemd unit pass must exist in the real binary's
//! `--help`; and the operational invariants hold (gateway replicas ≥ 2 with
//! a PodDisruptionBudget and a UDP 15443 LoadBalancer whose provider
//! settings come from one of deploy/components/lb-*, Secrets mounted
//! 0400, probes on /readyz and /healthz, non-root read-only containers
//! without capabilities, RBAC writing only Services and EndpointSlices).
//! Least privilege: the gateway's ServiceAccount only reads, the mirror
//! controller has its own, and the ValidatingAdmissionPolicy that limits
//! its writes to mirror objects is evaluated here with a CEL interpreter
//! against the objects the controller really writes and the ones a
//! controller taken over would try.
//! Every reference a pod spec makes (ConfigMaps, Secrets, its
//! ServiceAccount) and every binding's ServiceAccount must resolve to an
//! object rendered in the same namespace (Secrets may instead be ones a
//! comment in deploy/ says to create first), so that `kubectl apply -k`
//! leaves no pod unable to start. The overlays use kustomize components
//! (`components:`, kustomize v3.7 or later: kubectl 1.21 or later; the
//! project's machines have kubectl 1.32 with kustomize v5.5); an older
//! kubectl fails the test with a message. Every load-balancer component is
//! also rendered on the base alone and checked for its provider's settings.
//! Without kubectl (or systemd-analyze) those parts are skipped with a
//! message; .ci/run installs kubectl.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use meshfed_tests::bin;
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// What a binary accepts: its long flags and environment variables.
#[derive(Debug)]
struct Accepts {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn accepts(binary: &str, subcommand: Option<&str>) -> Accepts {
    let out = Command::new(bin(binary))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{binary} {subcommand:?} --help failed"
    );
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(f) = word.strip_prefix("--") {
            let f: String = f
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !f.is_empty() {
                flags.insert(f);
            }
        }
    }
    for part in help.split("[env: ").skip(1) {
        if let Some((name, _)) = part.split_once('=') {
            env.insert(name.to_string());
        }
    }
    assert!(flags.contains("config"), "{binary}: no --config in help");
    Accepts { flags, env }
}

fn kubectl() -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

fn render(kubectl: &Path, overlay: &str) -> Vec<Value> {
    render_dir(kubectl, &repo().join("deploy/overlays").join(overlay))
}

fn render_dir(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr),
        if String::from_utf8_lossy(&out.stderr).contains("Component") {
            "\nhint: deploy/ uses kustomize components, which need kubectl 1.21 or later \
             (kustomize v3.7+); Debian's kubectl 1.20 embeds kustomize v2.0.3"
        } else {
            ""
        }
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Deserializes an object into its k8s-openapi type, by kind.
fn typed(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let v = obj.clone();
    let r = match kind.as_str() {
        "Namespace" => serde_yaml::from_value::<Namespace>(v).map(|_| ()),
        "ServiceAccount" => serde_yaml::from_value::<ServiceAccount>(v).map(|_| ()),
        "ClusterRole" => serde_yaml::from_value::<ClusterRole>(v).map(|_| ()),
        "ClusterRoleBinding" => serde_yaml::from_value::<ClusterRoleBinding>(v).map(|_| ()),
        "Role" => serde_yaml::from_value::<Role>(v).map(|_| ()),
        "RoleBinding" => serde_yaml::from_value::<RoleBinding>(v).map(|_| ()),
        "Deployment" => serde_yaml::from_value::<Deployment>(v).map(|_| ()),
        "Service" => serde_yaml::from_value::<Service>(v).map(|_| ()),
        "PodDisruptionBudget" => serde_yaml::from_value::<PodDisruptionBudget>(v).map(|_| ()),
        "NetworkPolicy" => serde_yaml::from_value::<NetworkPolicy>(v).map(|_| ()),
        "ConfigMap" => serde_yaml::from_value::<ConfigMap>(v).map(|_| ()),
        "ValidatingAdmissionPolicy" => {
            serde_yaml::from_value::<ValidatingAdmissionPolicy>(v).map(|_| ())
        }
        "ValidatingAdmissionPolicyBinding" => {
            serde_yaml::from_value::<ValidatingAdmissionPolicyBinding>(v).map(|_| ())
        }
        other => panic!("{other} {name}: a kind this test does not know; add it"),
    };
    if let Err(e) = r {
        panic!("{kind} {name} does not deserialize into its k8s-openapi type: {e}");
    }
    format!("{kind}/{name}")
}

fn config_keys(text: &str) -> Vec<String> {
    let map: serde_yaml::Mapping = serde_yaml::from_str(text).unwrap();
    map.keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// Flags, env vars and the --config file's keys of one container.
fn check_container(c: &Container, objects: &[Value], where_: &str) {
    let command = c.command.clone().unwrap_or_default();
    let binary = Path::new(command.first().expect("command"))
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let args = c.args.clone().unwrap_or_default();
    // `meshfed-gateway mirror ...`: the subcommand's own flags.
    let subcommand = args.first().filter(|a| !a.starts_with('-')).cloned();
    let accepts = accepts(&binary, subcommand.as_deref());
    for a in &args {
        if let Some(flag) = a.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap();
            assert!(
                accepts.flags.contains(flag),
                "{where_}: {binary} has no --{flag} (its --help lists {:?})",
                accepts.flags
            );
        }
    }
    for e in c.env.iter().flatten() {
        if e.name.starts_with("MESHFED_") {
            assert!(
                accepts.env.contains(&e.name),
                "{where_}: {binary} reads no {}",
                e.name
            );
        }
    }
    // The --config file, from the ConfigMap mounted at its directory (a
    // subcommand may take its few flags inline).
    let Some(i) = args.iter().position(|a| a == "--config") else {
        assert!(subcommand.is_some(), "{where_}: no --config");
        check_hardening(c, where_);
        return;
    };
    let path = Path::new(&args[i + 1]);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{where_}: nothing mounted at {}", path.display()));
    let key = path.file_name().unwrap().to_string_lossy().to_string();
    let deployment = objects
        .iter()
        .find(|o| {
            o["kind"] == "Deployment" && where_.ends_with(o["metadata"]["name"].as_str().unwrap())
        })
        .unwrap();
    let cm_name = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some(mount.name.as_str()))
        .and_then(|v| v["configMap"]["name"].as_str())
        .unwrap_or_else(|| panic!("{where_}: {} is not a ConfigMap volume", mount.name));
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("{where_}: ConfigMap {cm_name} is not rendered"));
    let text = cm["data"][key.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no {key}"));
    for k in config_keys(text) {
        assert!(
            accepts.flags.contains(&k),
            "{where_}: config key `{k}` in {cm_name}/{key} is not a {binary} setting"
        );
    }
    check_hardening(c, where_);
}

fn check_hardening(c: &Container, where_: &str) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{where_}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{where_}");
    let drop = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert_eq!(drop, ["ALL"], "{where_}: capabilities drop ALL");
    let res = c.resources.as_ref().expect("resources");
    assert!(
        res.requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory")),
        "{where_}: memory request"
    );
}

fn check_overlay(kubectl: &Path, overlay: &str) {
    let objects = render(kubectl, overlay);
    let names: Vec<String> = objects.iter().map(typed).collect();
    eprintln!("{overlay}: {names:?}");
    check_references(overlay, &objects);
    check_selectors_and_ports(overlay, &objects);
    for o in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let d: Deployment = serde_yaml::from_value(o.clone()).unwrap();
        let name = d.metadata.name.clone().unwrap();
        let spec = d.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(
            psc.run_as_non_root,
            Some(true),
            "{overlay}/{name}: runAsNonRoot"
        );
        for v in pod.volumes.iter().flatten() {
            if let Some(s) = &v.secret {
                assert_eq!(
                    s.default_mode,
                    Some(0o400),
                    "{overlay}/{name}: secret {} mode 0400",
                    v.name
                );
            }
        }
        for c in &pod.containers {
            check_container(c, &objects, &format!("{overlay}/{name}"));
            let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
                p.as_ref()
                    .and_then(|p| p.http_get.as_ref())
                    .and_then(|h| h.path.clone())
                    .unwrap_or_default()
            };
            if name == "meshfed-gateway" {
                assert!(
                    spec.replicas.unwrap_or(1) >= 2,
                    "{overlay}: gateway replicas ≥ 2"
                );
                assert_eq!(path(&c.readiness_probe), "/readyz", "{overlay}");
                assert_eq!(path(&c.liveness_probe), "/healthz", "{overlay}");
                check_termination_grace(overlay, pod, &objects);
            } else {
                assert_eq!(path(&c.liveness_probe), "/healthz", "{overlay}/{name}");
            }
        }
    }
    assert!(
        objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"),
        "{overlay}: the gateway has a PodDisruptionBudget"
    );
    let lb = objects.iter().any(|o| {
        o["kind"] == "Service"
            && o["spec"]["type"] == "LoadBalancer"
            && o["spec"]["ports"].as_sequence().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["port"].as_u64() == Some(15443) && p["protocol"] == "UDP")
            })
    });
    assert!(lb, "{overlay}: a UDP 15443 LoadBalancer Service");
    check_least_privilege(overlay, &objects);
    check_load_balancer_choice(overlay, &objects);
    check_network_policy(overlay, &objects);
    // RBAC: read-only except Services and EndpointSlices, and the mirror
    // writers' Lease in the gateway's own namespace (a Role); never secrets.
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        // A Role's and a ClusterRole's rules are the same type.
        let rules: Vec<PolicyRule> = serde_yaml::from_value(o["rules"].clone()).unwrap();
        for rule in &rules {
            let resources = rule.resources.clone().unwrap_or_default();
            assert!(
                !resources.iter().any(|r| r == "*" || r == "secrets"),
                "{overlay}: {resources:?}"
            );
            let writes = rule
                .verbs
                .iter()
                .any(|v| !matches!(v.as_str(), "get" | "list" | "watch"));
            if writes {
                let lease_in_own_namespace = o["kind"] == "Role"
                    && resources.iter().all(|r| r == "leases")
                    && rule
                        .api_groups
                        .iter()
                        .flatten()
                        .all(|g| g == "coordination.k8s.io");
                assert!(
                    lease_in_own_namespace
                        || resources
                            .iter()
                            .all(|r| r == "services" || r == "endpointslices"),
                    "{overlay}: writes beyond mirror Services: {resources:?} {:?}",
                    rule.verbs
                );
                assert!(
                    !rule.verbs.iter().any(|v| v == "*"),
                    "{overlay}: wildcard verbs"
                );
            }
        }
    }
}

/// The rules bound to ServiceAccount `ns/sa`, with the binding's name.
fn rules_of(objects: &[Value], ns: &str, sa: &str) -> Vec<(String, PolicyRule)> {
    let mut out = Vec::new();
    for b in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let binds = b["subjects"].as_sequence().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"].as_str() == Some(sa)
                && s["namespace"].as_str().unwrap_or(&namespace_of(b)) == ns
        });
        if !binds {
            continue;
        }
        let (kind, name) = (&b["roleRef"]["kind"], &b["roleRef"]["name"]);
        let role = objects
            .iter()
            .find(|o| {
                &o["kind"] == kind
                    && &o["metadata"]["name"] == name
                    && (o["kind"] == "ClusterRole" || namespace_of(o) == namespace_of(b))
            })
            .unwrap_or_else(|| {
                panic!(
                    "binding {:?} refers to a role not rendered",
                    b["metadata"]["name"]
                )
            });
        let rules: Vec<PolicyRule> = serde_yaml::from_value(role["rules"].clone()).unwrap();
        let binding = b["metadata"]["name"].as_str().unwrap_or("").to_string();
        out.extend(rules.into_iter().map(|r| (binding.clone(), r)));
    }
    out
}

/// Least privilege (issue 22, item 10): the internet-facing gateway's
/// ServiceAccount may only read; the mirror controller, with its own, may
/// write Services and EndpointSlices, and a ValidatingAdmissionPolicy,
/// evaluated here as kube-apiserver would, lets it write only mirror
/// objects.
fn check_least_privilege(overlay: &str, objects: &[Value]) {
    let deployment = |name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == name)
            .map(|o| serde_yaml::from_value::<Deployment>(o.clone()).unwrap())
    };
    let sa_of = |d: &Deployment| {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        (
            d.metadata.namespace.clone().unwrap_or_default(),
            pod.service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        )
    };
    let gateway = deployment("meshfed-gateway").expect("the gateway Deployment");
    let (gw_ns, gw_sa) = sa_of(&gateway);
    for (binding, rule) in rules_of(objects, &gw_ns, &gw_sa) {
        assert!(
            rule.verbs
                .iter()
                .all(|v| matches!(v.as_str(), "get" | "list" | "watch")),
            "{overlay}: the gateway's ServiceAccount {gw_sa} may {:?} {:?} (binding {binding}); the internet-facing gateway only reads, the mirror controller writes",
            rule.verbs,
            rule.resources
        );
    }
    let Some(mirror) = deployment("meshfed-mirror") else {
        return;
    };
    let (ns, sa) = sa_of(&mirror);
    assert_ne!(
        sa, gw_sa,
        "{overlay}: the mirror controller has a ServiceAccount of its own"
    );
    let args = mirror
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("mirror"),
        "{overlay}"
    );
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let policies: Vec<ValidatingAdmissionPolicy> = objects
        .iter()
        .filter(|o| o["kind"] == "ValidatingAdmissionPolicy")
        .map(|o| serde_yaml::from_value(o.clone()).unwrap())
        .collect();
    let bindings: Vec<ValidatingAdmissionPolicyBinding> = objects
        .iter()
        .filter(|o| o["kind"] == "ValidatingAdmissionPolicyBinding")
        .map(|o| serde_yaml::from_value(o.clone()).unwrap())
        .collect();
    let policy = policies
        .iter()
        .find(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            bindings.iter().any(|b| {
                b.spec.as_ref().is_some_and(|s| {
                    s.policy_name.as_deref() == Some(name.as_str())
                        && s.validation_actions
                            .iter()
                            .flatten()
                            .any(|a| a == "Deny")
                })
            })
        })
        .unwrap_or_else(|| {
            panic!("{overlay}: no ValidatingAdmissionPolicy bound with Deny limits the mirror controller's writes")
        });
    admission::check(overlay, policy, &user);
}

/// The ValidatingAdmissionPolicy's CEL, evaluated against the writes the
/// mirror controller makes (its own objects, from `meshfed_gateway::mirror`)
/// and the ones a controller taken over would try.
mod admission {
    use cel_interpreter::{Context, Program, Value as Cel};
    use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
    use meshfed_gateway::mirror::{GatewayView, MirrorSettings, PortSources, desired};
    use serde_json::{Value, json};

    fn eval(expr: &str, request: &Value, object: &Value, old: &Value) -> Result<bool, String> {
        let program = Program::compile(expr).map_err(|e| format!("does not compile: {e}"))?;
        let mut ctx = Context::default();
        ctx.add_variable("request", request.clone())
            .map_err(|e| e.to_string())?;
        ctx.add_variable("object", object.clone())
            .map_err(|e| e.to_string())?;
        ctx.add_variable("oldObject", old.clone())
            .map_err(|e| e.to_string())?;
        match program.execute(&ctx) {
            Ok(Cel::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("gives {other:?}, not a bool")),
            Err(e) => Err(format!("fails: {e}")),
        }
    }

    /// Whether the policy admits `operation` of `object` (over `old`) by
    /// `user`; the message of the first validation that refuses.
    fn admits(
        policy: &ValidatingAdmissionPolicy,
        user: &str,
        operation: &str,
        resource: &str,
        object: &Value,
        old: &Value,
    ) -> Result<(), String> {
        let spec = policy.spec.as_ref().unwrap();
        let request = json!({
            "operation": operation,
            "userInfo": {"username": user},
            "resource": {"resource": resource},
        });
        for c in spec.match_conditions.iter().flatten() {
            if !eval(&c.expression, &request, object, old)
                .unwrap_or_else(|e| panic!("matchCondition `{}` {e}", c.expression))
            {
                return Ok(());
            }
        }
        for v in spec.validations.iter().flatten() {
            let ok = eval(&v.expression, &request, object, old).unwrap_or_else(|e| {
                panic!("validation `{}` {e} ({operation} {resource})", v.expression)
            });
            if !ok {
                return Err(v.message.clone().unwrap_or_else(|| v.expression.clone()));
            }
        }
        Ok(())
    }

    pub fn check(overlay: &str, policy: &ValidatingAdmissionPolicy, user: &str) {
        // The objects the controller writes, as it builds them.
        let view: GatewayView = serde_json::from_value(json!({
            "cluster": "east", "gateway": "gw-0", "domain": "cluster.local",
            "applied": {"version": "c1", "content_hash": "", "source": {"kind": "file", "dir": "p"}, "applied_at_unix_ms": 0},
            "outbound_port": 15001,
            "exports": {"ratings.bookinfo.svc.cluster.local": ["west"]},
            "announced": [],
        }))
        .unwrap();
        let settings = MirrorSettings {
            target: ("meshfed-gateway-outbound".into(), "meshfed-system".into()),
            outbound_port: 15001,
            default_ports: vec![80],
        };
        let (want, _) = desired(
            &view,
            &PortSources::default(),
            &["10.0.0.7".parse().unwrap()],
            &settings,
        );
        assert!(!want.is_empty());
        let null = Value::Null;
        for d in &want {
            let mut svc = serde_json::to_value(&d.service).unwrap();
            // kube-apiserver defaults the type before admission.
            svc["spec"]["type"] = json!("ClusterIP");
            let slice = serde_json::to_value(&d.slice).unwrap();
            for (resource, obj) in [("services", &svc), ("endpointslices", &slice)] {
                for (op, object, old) in [
                    ("CREATE", obj, &null),
                    ("UPDATE", obj, obj),
                    ("DELETE", &null, obj),
                ] {
                    admits(policy, user, op, resource, object, old).unwrap_or_else(|m| {
                        panic!("{overlay}: the policy refuses the controller's own {op} of {resource} {}: {m}", d.name)
                    });
                }
            }
        }
        // What a controller taken over would try.
        let foreign = json!({"metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
                             "spec": {"type": "ClusterIP", "selector": {"k8s-app": "kube-dns"}}});
        let mut hijacked = foreign.clone();
        hijacked["metadata"]["labels"]["meshfed.io/mirror-of"] = json!("kube-dns");
        let mut mirror = serde_json::to_value(&want[0].service).unwrap();
        mirror["spec"]["type"] = json!("ClusterIP");
        let mut with_external_ip = mirror.clone();
        with_external_ip["spec"]["externalIPs"] = json!(["1.2.3.4"]);
        let mut with_selector = mirror.clone();
        with_selector["spec"]["selector"] = json!({"app": "payments"});
        let mut load_balancer = mirror.clone();
        load_balancer["spec"]["type"] = json!("LoadBalancer");
        let mut unlabelled = mirror.clone();
        unlabelled["metadata"]["labels"] = json!({});
        let refused = [
            (
                "create an unlabelled Service",
                "CREATE",
                "services",
                &unlabelled,
                &null,
            ),
            (
                "take over a Service by labelling it",
                "UPDATE",
                "services",
                &hijacked,
                &foreign,
            ),
            (
                "delete another Service",
                "DELETE",
                "services",
                &null,
                &foreign,
            ),
            (
                "give a mirror an external IP",
                "CREATE",
                "services",
                &with_external_ip,
                &null,
            ),
            (
                "give a mirror a selector",
                "UPDATE",
                "services",
                &with_selector,
                &mirror,
            ),
            (
                "make a mirror a LoadBalancer",
                "CREATE",
                "services",
                &load_balancer,
                &null,
            ),
            (
                "delete another EndpointSlice",
                "DELETE",
                "endpointslices",
                &null,
                &foreign,
            ),
        ];
        for (what, op, resource, object, old) in refused {
            assert!(
                admits(policy, user, op, resource, object, old).is_err(),
                "{overlay}: the admission policy lets the mirror controller {what}"
            );
            // Other users (the cluster's own controllers) are not limited.
            assert!(
                admits(
                    policy,
                    "system:serviceaccount:kube-system:endpointslice-controller",
                    op,
                    resource,
                    object,
                    old
                )
                .is_ok(),
                "{overlay}: the admission policy limits other users too ({what})"
            );
        }
    }
}

/// The `meshfed.io/load-balancer` annotation: which deploy/components/lb-*
/// set a Service's provider settings.
const LB_CHOICE: &str = "meshfed.io/load-balancer";

/// Issue 22, item 7: a UDP LoadBalancer without provider settings is what
/// AWS's default (a Classic Load Balancer, no UDP) rejects. Every rendered
/// UDP LoadBalancer Service must name the component that configured it,
/// that component must exist, and its settings must be on the Service.
fn check_load_balancer_choice(overlay: &str, objects: &[Value]) {
    let udp_lbs: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "Service"
                && o["spec"]["type"] == "LoadBalancer"
                && o["spec"]["ports"]
                    .as_sequence()
                    .is_some_and(|ps| ps.iter().any(|p| p["protocol"] == "UDP"))
        })
        .collect();
    assert!(
        !udp_lbs.is_empty(),
        "{overlay}: no UDP LoadBalancer Service"
    );
    for svc in udp_lbs {
        let name = svc["metadata"]["name"].as_str().unwrap_or("");
        let Some(choice) = svc["metadata"]["annotations"][LB_CHOICE].as_str() else {
            panic!(
                "{overlay}: Service {name} is a UDP LoadBalancer with no provider settings \
                 (no `{LB_CHOICE}` annotation): add `components: [../../components/lb-...]` to \
                 the overlay (docs/kubernetes.md, \"Exposing the tunnel\")"
            );
        };
        let dir = repo()
            .join("deploy/components")
            .join(format!("lb-{choice}"));
        assert!(
            dir.join("kustomization.yaml").exists(),
            "{overlay}: Service {name} names load balancer `{choice}`, but {} does not exist",
            dir.display()
        );
        check_provider_settings(&format!("{overlay}: Service {name}"), choice, svc, objects);
    }
}

/// The settings component `lb-<choice>` promises, on a rendered tunnel
/// Service (with the Deployment it fronts in `objects`).
fn check_provider_settings(what: &str, choice: &str, svc: &Value, objects: &[Value]) {
    let typed: Service = serde_yaml::from_value(svc.clone()).unwrap();
    let spec = typed.spec.unwrap_or_default();
    let ann = typed.metadata.annotations.unwrap_or_default();
    let a = |k: &str| ann.get(k).map(String::as_str);
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"), "{what}");
    assert_eq!(
        spec.external_traffic_policy.as_deref(),
        Some("Local"),
        "{what}: externalTrafficPolicy Local (node health checks follow pod readiness)"
    );
    let ports = spec.ports.unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.port == 15443 && p.protocol.as_deref() == Some("UDP")),
        "{what}: the tunnel on UDP 15443: {ports:?}"
    );
    // TCP links (issue 18) on the same port number, and nothing else: any
    // other port here would be a listener nothing serves.
    assert!(
        ports
            .iter()
            .any(|p| p.port == 15443 && p.protocol.as_deref() == Some("TCP")),
        "{what}: TCP links on TCP 15443: {ports:?}"
    );
    assert!(
        ports.iter().all(|p| p.port == 15443),
        "{what}: a port other than the tunnel's on the tunnel Service: {ports:?}"
    );
    let aws = "service.beta.kubernetes.io/aws-load-balancer-";
    match choice {
        "aws-nlb" => {
            assert_eq!(
                spec.load_balancer_class.as_deref(),
                Some("service.k8s.aws/nlb"),
                "{what}: an NLB of the AWS Load Balancer Controller, never the in-tree \
                 Classic Load Balancer (no UDP)"
            );
            assert_eq!(a(&format!("{aws}nlb-target-type")), Some("ip"), "{what}");
            assert_eq!(
                a(&format!("{aws}scheme")),
                Some("internet-facing"),
                "{what}"
            );
            // UDP target groups are health-checked over TCP or HTTP: it must
            // be the gateway's readiness endpoint on its admin port.
            let (admin_port, ready_path) = gateway_readiness(objects);
            assert_eq!(
                a(&format!("{aws}healthcheck-protocol")),
                Some("HTTP"),
                "{what}"
            );
            assert_eq!(
                a(&format!("{aws}healthcheck-port")),
                Some(admin_port.to_string().as_str()),
                "{what}: the health check must hit the gateway's admin port"
            );
            assert_eq!(
                a(&format!("{aws}healthcheck-path")),
                Some(ready_path.as_str()),
                "{what}: the health check must follow the readinessProbe"
            );
        }
        "gcp" => {
            assert_eq!(a("cloud.google.com/l4-rbs"), Some("enabled"), "{what}");
            assert_eq!(spec.load_balancer_class, None, "{what}");
        }
        "metallb" => {
            let pool = a("metallb.io/address-pool");
            assert!(pool.is_some(), "{what}: no MetalLB address pool");
            assert_eq!(pool, a("metallb.universe.tf/address-pool"), "{what}");
            assert_eq!(spec.load_balancer_class, None, "{what}");
        }
        // The provider's default load balancer carries UDP as is.
        "azure" | "servicelb" => {
            assert_eq!(spec.load_balancer_class, None, "{what}");
            assert!(
                !ann.keys().any(|k| k.starts_with(aws)),
                "{what}: AWS annotations on a {choice} load balancer"
            );
        }
        other => panic!(
            "{what}: load balancer `{other}` has no expectations in tests/tests/deploy.rs \
             (check_provider_settings); add them with the component"
        ),
    }
}

/// The gateway container's admin port number and readinessProbe path.
fn gateway_readiness(objects: &[Value]) -> (i32, String) {
    let d = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "meshfed-gateway")
        .expect("a meshfed-gateway Deployment");
    let d: Deployment = serde_yaml::from_value(d.clone()).unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let admin = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("admin"))
        .expect("the gateway's `admin` port")
        .container_port;
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("the gateway's HTTP readinessProbe");
    let probe_port = match &probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
            assert_eq!(name, "admin", "the readinessProbe's port");
            admin
        }
    };
    assert_eq!(probe_port, admin, "the readinessProbe is on the admin port");
    (admin, probe.path.clone().unwrap_or_default())
}

/// Issue 22, item 7: every deploy/components/lb-* renders on the base
/// alone into a UDP tunnel Service with that provider's settings, and every
/// overlay that uses a component renders it (the overlay test checks).
#[test]
fn every_load_balancer_component_renders_the_tunnel_with_its_provider_settings() {
    let Some(kubectl) = kubectl() else {
        eprintln!("SKIPPED: kubectl not found; install kubectl 1.21 or later");
        return;
    };
    let mut components: Vec<String> = std::fs::read_dir(repo().join("deploy/components"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("lb-"))
        .collect();
    components.sort();
    assert!(
        components.len() >= 5,
        "deploy/components: expected lb-aws-nlb, lb-azure, lb-gcp, lb-metallb and \
         lb-servicelb, found {components:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    for comp in &components {
        let dir = tmp.path().join(comp);
        std::fs::create_dir_all(&dir).unwrap();
        // kustomize takes only relative paths to other kustomizations.
        let up = "../".repeat(dir.components().count() - 1);
        let from_root =
            |p: PathBuf| format!("{up}{}", p.display().to_string().trim_start_matches('/'));
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "resources:\n- {}\ncomponents:\n- {}\n",
                from_root(repo().join("deploy/base")),
                from_root(repo().join("deploy/components").join(comp))
            ),
        )
        .unwrap();
        let objects = render_dir(&kubectl, &dir);
        for o in &objects {
            typed(o);
        }
        let svc = objects
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "meshfed-gateway-tunnel")
            .unwrap_or_else(|| panic!("{comp}: no meshfed-gateway-tunnel Service"));
        let choice = svc["metadata"]["annotations"][LB_CHOICE]
            .as_str()
            .unwrap_or_else(|| panic!("{comp}: the Service does not carry `{LB_CHOICE}`"));
        assert_eq!(
            Some(choice),
            comp.strip_prefix("lb-"),
            "{comp}: names another load balancer"
        );
        check_provider_settings(comp, choice, svc, &objects);
    }
}

/// Without a component, the base's tunnel Service has no provider choice:
/// the overlay check above is what catches an overlay that forgot one.
#[test]
fn the_base_alone_makes_no_provider_choice() {
    let Some(kubectl) = kubectl() else {
        eprintln!("SKIPPED: kubectl not found");
        return;
    };
    let objects = render_dir(&kubectl, &repo().join("deploy/base"));
    let svc = objects
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "meshfed-gateway-tunnel")
        .expect("the base's tunnel Service");
    assert!(svc["metadata"]["annotations"][LB_CHOICE].is_null());
    let overlay_check = std::panic::catch_unwind(|| check_load_balancer_choice("base", &objects));
    assert!(
        overlay_check.is_err(),
        "the overlay check accepts a UDP LoadBalancer without provider settings"
    );
}

/// The duration setting `key` of the gateway: from its rendered config
/// file, else the default its `--help` states.
fn gateway_duration(config: &serde_yaml::Mapping, key: &str) -> std::time::Duration {
    let text = match config.get(key).and_then(Value::as_str) {
        Some(v) => v.to_string(),
        None => {
            let out = Command::new(bin("meshfed-gateway"))
                .arg("--help")
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&out.stdout).to_string();
            let after = help
                .split_once(&format!("--{key} "))
                .unwrap_or_else(|| panic!("meshfed-gateway --help has no --{key}"))
                .1;
            let default = after
                .split_once("[default: ")
                .and_then(|(_, d)| d.split_once(']'))
                .unwrap_or_else(|| panic!("--{key} states no default"))
                .0;
            default.to_string()
        }
    };
    meshfed_policy::syntax::parse_duration(&text)
        .unwrap_or_else(|e| panic!("gateway setting {key}: {text:?}: {e}"))
}

/// SIGTERM keeps the gateway serving for the drain grace, then gives the
/// callers' connections the drain deadline, then the links and the trace
/// flush up to the same again (gateway/src/run.rs): the pod's
/// terminationGracePeriodSeconds must cover all of it with 2 s to spare,
/// or the kubelet's SIGKILL cuts requests a rollout should have drained.
fn check_termination_grace(
    overlay: &str,
    pod: &k8s_openapi::api::core::v1::PodSpec,
    objects: &[Value],
) {
    let text = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("meshfed-gateway-config"))
        })
        .and_then(|cm| cm["data"]["gateway.yaml"].as_str())
        .unwrap_or_else(|| panic!("{overlay}: no rendered gateway config"));
    let config: serde_yaml::Mapping = serde_yaml::from_str(text).unwrap();
    let grace = gateway_duration(&config, "drain-grace");
    let drain = gateway_duration(&config, "drain-timeout");
    let needed = grace + drain * 2 + std::time::Duration::from_secs(2);
    // Kubernetes' default when unset is 30 s.
    let period = pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        std::time::Duration::from_secs(u64::try_from(period).unwrap_or(0)) >= needed,
        "{overlay}: terminationGracePeriodSeconds {period} is shorter than drain-grace \
         {grace:?} + 2 x drain-timeout {drain:?} + 2s = {needed:?}: the kubelet would kill \
         the gateway mid-drain"
    );
}

/// The namespace an object renders in (`""`: none, so `kubectl apply` would
/// put it wherever the caller's context points).
fn namespace_of(o: &Value) -> String {
    o["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Secret names that a `#` comment in deploy/ tells the operator to create
/// before applying (the certificates and tokens are never in Git).
fn documented_secrets() -> String {
    let mut comments = String::new();
    for dir in ["deploy/base", "deploy/overlays/edge-gateway"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.trim_start().starts_with('#')) {
                comments.push_str(line);
                comments.push('\n');
            }
        }
    }
    comments
}

/// Every name a pod spec refers to: (kind, name), for ConfigMaps, Secrets
/// and the ServiceAccount; optional references are left out (a pod starts
/// without them).
fn pod_references(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<(&'static str, String)> {
    let mut refs = Vec::new();
    refs.push((
        "ServiceAccount",
        pod.service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
    ));
    for v in pod.volumes.iter().flatten() {
        if let Some(c) = &v.config_map
            && c.optional != Some(true)
        {
            refs.push(("ConfigMap", c.name.clone()));
        }
        if let Some(s) = &v.secret
            && s.optional != Some(true)
        {
            refs.push(("Secret", s.secret_name.clone().unwrap_or_default()));
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &p.config_map
                && c.optional != Some(true)
            {
                refs.push(("ConfigMap", c.name.clone()));
            }
            if let Some(s) = &p.secret
                && s.optional != Some(true)
            {
                refs.push(("Secret", s.name.clone()));
            }
        }
    }
    for s in pod.image_pull_secrets.iter().flatten() {
        refs.push(("Secret", s.name.clone()));
    }
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            let from = e.value_from.as_ref();
            if let Some(r) = from.and_then(|f| f.config_map_key_ref.as_ref())
                && r.optional != Some(true)
            {
                refs.push(("ConfigMap", r.name.clone()));
            }
            if let Some(r) = from.and_then(|f| f.secret_key_ref.as_ref())
                && r.optional != Some(true)
            {
                refs.push(("Secret", r.name.clone()));
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref
                && r.optional != Some(true)
            {
                refs.push(("ConfigMap", r.name.clone()));
            }
            if let Some(r) = &e.secret_ref
                && r.optional != Some(true)
            {
                refs.push(("Secret", r.name.clone()));
            }
        }
    }
    refs
}

/// What `kubectl apply -k` would leave unable to start: a pod spec that
/// names a ConfigMap, Secret or ServiceAccount not rendered in its own
/// namespace (a generated ConfigMap renamed with its hash while the volume
/// kept the bare name, or rendered without the namespace), a binding to a
/// ServiceAccount that is not there, or an object in a namespace that the
/// overlay does not create.
fn check_references(overlay: &str, objects: &[Value]) {
    let rendered = |kind: &str, ns: &str, name: &str| {
        objects.iter().any(|o| {
            o["kind"] == kind
                && o["metadata"]["name"].as_str() == Some(name)
                && namespace_of(o) == ns
        })
    };
    let documented = documented_secrets();
    let namespaces: BTreeSet<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Namespace")
        .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
        .collect();
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or("");
        if cluster_scoped.contains(&kind) {
            continue;
        }
        let name = o["metadata"]["name"].as_str().unwrap_or("");
        let ns = namespace_of(o);
        assert!(
            namespaces.contains(&ns),
            "{overlay}: {kind} {name} renders in namespace `{ns}`, which the overlay does not \
             create (rendered namespaces: {namespaces:?}); set `namespace:` on it or in the \
             kustomization that generates it"
        );
    }
    let mut checked = 0;
    for o in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let d: Deployment = serde_yaml::from_value(o.clone()).unwrap();
        let name = d.metadata.name.clone().unwrap();
        let ns = namespace_of(o);
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        for (kind, target) in pod_references(pod) {
            checked += 1;
            if rendered(kind, &ns, &target) {
                continue;
            }
            if kind == "Secret" && documented.contains(&target) {
                // Created by the operator before applying (docs/kubernetes.md).
                continue;
            }
            let same_name: Vec<String> = objects
                .iter()
                .filter(|x| x["kind"] == kind)
                .map(|x| {
                    format!(
                        "{}/{}",
                        namespace_of(x),
                        x["metadata"]["name"].as_str().unwrap_or("")
                    )
                })
                .collect();
            panic!(
                "{overlay}: Deployment {ns}/{name} refers to {kind} `{target}`, which the overlay \
                 does not render in namespace `{ns}` (rendered {kind}s: {same_name:?}); its pods \
                 could not start"
            );
        }
    }
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let name = o["metadata"]["name"].as_str().unwrap_or("");
        for s in o["subjects"].as_sequence().into_iter().flatten() {
            if s["kind"] == "ServiceAccount" {
                checked += 1;
                let (ns, sa) = (
                    s["namespace"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or(""),
                );
                assert!(
                    rendered("ServiceAccount", ns, sa),
                    "{overlay}: binding {name} names ServiceAccount {ns}/{sa}, which is not rendered"
                );
            }
        }
    }
    assert!(checked > 0, "{overlay}: no references found to check");
}

/// Issue 22: a NetworkPolicy selects the gateway's pods in their namespace
/// and admits exactly the gateway container's ports (a port added to the
/// container without the policy would be closed on a cluster enforcing
/// it; one in the policy without the container is an opening for
/// nothing): the tunnel's from anywhere (peers come through the load
/// balancer), the outbound and admin ports only from the cluster's pods
/// (`namespaceSelector: {}`, never an ipBlock or an empty `from`).
fn check_network_policy(overlay: &str, objects: &[Value]) {
    let gateway = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "meshfed-gateway")
        .unwrap_or_else(|| panic!("{overlay}: no gateway Deployment"));
    let ns = namespace_of(gateway);
    let labels = &gateway["spec"]["template"]["metadata"]["labels"];
    let policies: Vec<NetworkPolicy> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy" && namespace_of(o) == ns)
        .filter(|o| selects(&o["spec"]["podSelector"]["matchLabels"], labels))
        .map(|o| serde_yaml::from_value(o.clone()).unwrap())
        .collect();
    assert_eq!(
        policies.len(),
        1,
        "{overlay}: one NetworkPolicy in `{ns}` selects the gateway's pods {labels:?}"
    );
    let spec = policies[0].spec.as_ref().unwrap();
    assert!(
        spec.policy_types.iter().flatten().any(|t| t == "Ingress"),
        "{overlay}: the gateway's NetworkPolicy restricts ingress"
    );
    let container: Container =
        serde_yaml::from_value(gateway["spec"]["template"]["spec"]["containers"][0].clone())
            .unwrap();
    let container_ports: BTreeSet<(String, i32, String)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.container_port,
                p.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let resolve =
        |protocol: &str, port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| {
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            container_ports
            .iter()
            .find(|(pr, n, name)| {
                pr == protocol
                    && match port {
                        IntOrString::Int(i) => n == i,
                        IntOrString::String(s) => name == s,
                    }
            })
            .cloned()
            .unwrap_or_else(|| {
                panic!("{overlay}: the NetworkPolicy admits {protocol} {port:?}, which the gateway container does not declare ({container_ports:?})")
            })
        };
    let mut admitted = BTreeSet::new();
    for rule in spec.ingress.iter().flatten() {
        let ports = rule.ports.as_ref().unwrap_or_else(|| {
            panic!("{overlay}: a NetworkPolicy rule without ports admits every port")
        });
        for p in ports {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = p.port.as_ref().unwrap_or_else(|| {
                panic!(
                    "{overlay}: a NetworkPolicy port without a number admits every {protocol} port"
                )
            });
            let (protocol, number, name) = resolve(&protocol, port);
            let anywhere = rule.from.as_ref().is_none_or(Vec::is_empty);
            // `tunnel` is QUIC links (UDP), `tunnel-tcp` TCP links.
            if name == "tunnel" || name == "tunnel-tcp" {
                assert!(
                    anywhere,
                    "{overlay}: the tunnel port must be open to the peers (no `from`)"
                );
            } else {
                let peers = rule.from.as_ref().unwrap_or_else(|| {
                    panic!("{overlay}: {protocol} {number} ({name}) is open to anyone; only the cluster's pods may reach it")
                });
                assert!(
                    !peers.is_empty()
                        && peers
                            .iter()
                            .all(|p| p.ip_block.is_none() && p.namespace_selector.is_some()),
                    "{overlay}: {protocol} {number} ({name}) must be admitted from the cluster's pods only (namespaceSelector), got {peers:?}"
                );
            }
            admitted.insert((protocol, number, name));
        }
    }
    assert_eq!(
        admitted, container_ports,
        "{overlay}: the gateway's NetworkPolicy must admit exactly its container's ports"
    );
}

/// Whether every `key: value` of a selector is among a pod's labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|m| {
        !m.is_empty() && m.iter().all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    })
}

/// What would route nothing or probe nothing on a real cluster: a Service
/// or PodDisruptionBudget whose selector matches no Deployment's pods in
/// its namespace, a Deployment whose selector misses its own template, and
/// a named `targetPort` or probe port that no selected container declares
/// (Kubernetes resolves names against the pod's `containerPort` names and
/// leaves the endpoint out, or fails the probe, when none matches).
fn check_selectors_and_ports(overlay: &str, objects: &[Value]) {
    let pods: Vec<(String, &Value, Vec<String>)> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap_or("").to_string();
            let labels = &d["spec"]["template"]["metadata"]["labels"];
            assert!(
                selects(&d["spec"]["selector"]["matchLabels"], labels),
                "{overlay}: Deployment {name}'s selector {:?} does not match its own pod \
                 labels {labels:?}",
                d["spec"]["selector"]["matchLabels"]
            );
            let port_names = d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect();
            (namespace_of(d), labels, port_names)
        })
        .collect();
    let mut checked = 0;
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "Service" || o["kind"] == "PodDisruptionBudget")
    {
        let kind = o["kind"].as_str().unwrap_or("");
        let name = o["metadata"]["name"].as_str().unwrap_or("");
        let ns = namespace_of(o);
        let selector = match kind {
            "Service" => &o["spec"]["selector"],
            _ => &o["spec"]["selector"]["matchLabels"],
        };
        let selected: Vec<&Vec<String>> = pods
            .iter()
            .filter(|(pns, labels, _)| *pns == ns && selects(selector, labels))
            .map(|(_, _, ports)| ports)
            .collect();
        checked += 1;
        assert!(
            !selected.is_empty(),
            "{overlay}: {kind} {ns}/{name} selects {selector:?}, which matches no Deployment's \
             pods in `{ns}`; it would route to or protect nothing"
        );
        for p in o["spec"]["ports"].as_sequence().into_iter().flatten() {
            if let Some(target) = p["targetPort"].as_str() {
                checked += 1;
                assert!(
                    selected
                        .iter()
                        .any(|names| names.iter().any(|n| n == target)),
                    "{overlay}: Service {ns}/{name} targets port `{target}`, which no selected \
                     container names (container ports: {selected:?})"
                );
            }
        }
    }
    for (d, (ns, _, names)) in objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .zip(&pods)
    {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let port = &c[probe]["httpGet"]["port"];
                if let Some(port) = port.as_str() {
                    checked += 1;
                    assert!(
                        names.iter().any(|n| n == port),
                        "{overlay}: {ns}/{}: {probe} uses port `{port}`, which the pod does not \
                         name (named ports: {names:?})",
                        d["metadata"]["name"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    assert!(
        checked > 0,
        "{overlay}: no selectors or ports found to check"
    );
}

/// docs/operations.md's install steps run in order on an empty cluster:
/// the namespace exists before the first Secret is created in it (kubectl
/// refuses `create secret -n X` for a namespace that does not exist).
#[test]
fn the_install_steps_create_the_namespace_before_the_secrets() {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let first_secret = doc
        .find("create secret")
        .expect("docs/operations.md creates the Secrets");
    let namespace = doc
        .find("deploy/base/namespace.yaml")
        .or_else(|| doc.find("create namespace meshfed-system"));
    assert!(
        namespace.is_some_and(|n| n < first_secret),
        "docs/operations.md: the Kubernetes install creates Secrets in meshfed-system before \
         any step creates that namespace; add `kubectl apply -f deploy/base/namespace.yaml` \
         before them"
    );
}

#[test]
fn every_overlay_renders_into_typed_objects_with_flags_the_binaries_accept() {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "SKIPPED: kubectl not found; install Debian's kubernetes-client (as .ci/run does) to render deploy/overlays"
        );
        return;
    };
    let mut overlays: Vec<String> = std::fs::read_dir(repo().join("deploy/overlays"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("kustomization.yaml").exists())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    overlays.sort();
    assert!(
        overlays.len() >= 3,
        "deploy/overlays: expected east, west and edge-gateway, found {overlays:?}"
    );
    for overlay in &overlays {
        check_overlay(&kubectl, overlay);
    }
}

#[test]
fn the_edge_systemd_unit_passes_only_flags_and_settings_the_gateway_accepts() {
    let dir = repo().join("deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("meshfed-gateway.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let accepts = accepts("meshfed-gateway", None);
    for word in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        let flag = word.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            accepts.flags.contains(flag),
            "ExecStart passes --{flag}, which meshfed-gateway lacks"
        );
    }
    for key in config_keys(&std::fs::read_to_string(dir.join("gateway.yaml")).unwrap()) {
        assert!(
            accepts.flags.contains(&key),
            "gateway.yaml key `{key}` is not a gateway setting"
        );
    }
    // systemd's SIGKILL must not cut the drain short either.
    let config: serde_yaml::Mapping =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("gateway.yaml")).unwrap()).unwrap();
    let needed = gateway_duration(&config, "drain-grace")
        + gateway_duration(&config, "drain-timeout") * 2
        + std::time::Duration::from_secs(2);
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec=");
    assert!(
        meshfed_policy::syntax::parse_duration(stop).unwrap() >= needed,
        "TimeoutStopSec={stop} is shorter than the gateway's drain ({needed:?})"
    );
    for want in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "StateDirectory=",
        "DynamicUser=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(want)),
            "the unit lacks {want}"
        );
    }
    // The static discovery file the unit's config names parses as one.
    let endpoints = std::fs::read_to_string(dir.join("endpoints.yaml")).unwrap();
    let v: Value = serde_yaml::from_str(&endpoints).unwrap();
    assert!(v["services"].as_mapping().is_some_and(|m| !m.is_empty()));

    let analyze = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .unwrap();
    if analyze.stdout.is_empty() {
        eprintln!("SKIPPED: systemd-analyze not found; the unit was not verified");
        return;
    }
    // Verify a copy whose ExecStart names the binary as built.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("meshfed-gateway.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/meshfed-gateway",
            &bin("meshfed-gateway").display().to_string(),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Only lines about our unit count (the host's own units may be noisy).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("meshfed-gateway.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}
