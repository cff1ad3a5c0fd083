//! `farmctl tokens create|list|revoke`: token administration (admin tokens).

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use flowfarm_proto::v1 as pb;
use serde_json::{json, Value};

use crate::client::Farm;
use crate::output::time;

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Make a token and print its secret, which is shown this once.
    Create {
        /// Its tenant: the batches it submits carry this name, and submit
        /// tokens of one name see the same batches.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// It stops working after this long: `90d`, `12h`, `30m`, `45s`.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
        /// Jobs of its tenant queued or rendering at once (submit tokens).
        #[arg(long)]
        max_queued_jobs: Option<u32>,
        /// Jobs in one batch (submit tokens).
        #[arg(long)]
        max_batch_jobs: Option<u32>,
        /// GPU-seconds its tenant may use over any 24 hours (submit tokens).
        #[arg(long)]
        max_gpu_seconds_per_day: Option<f64>,
    },
    /// List tokens (never their secrets).
    List {
        /// Also revoked and expired tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token: it stops working at once on this coordinator and
    /// within 10 seconds on the others.
    Revoke { token_id: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Submit,
    Admin,
    Worker,
}

impl From<RoleArg> for pb::TokenRole {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Submit => pb::TokenRole::Submit,
            RoleArg::Admin => pb::TokenRole::Admin,
            RoleArg::Worker => pb::TokenRole::Worker,
        }
    }
}

/// `90d`, `12h`, `30m`, `45s` or plain seconds, as seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: use a number with s, m, h or d (e.g. 90d)")),
    };
    let n: u64 = number.parse().map_err(|_| format!("`{text}`: use a number with s, m, h or d (e.g. 90d)"))?;
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("`{text}` must be a positive duration")),
        Some(seconds) => Ok(seconds),
    }
}

fn role_name(role: i32) -> &'static str {
    match pb::TokenRole::try_from(role) {
        Ok(pb::TokenRole::Submit) => "submit",
        Ok(pb::TokenRole::Admin) => "admin",
        Ok(pb::TokenRole::Worker) => "worker",
        _ => "unknown",
    }
}

pub fn token_json(t: &pb::Token) -> Value {
    let q = t.quotas.unwrap_or_default();
    let limit = |n: u32| if n == 0 { Value::Null } else { json!(n) };
    json!({
        "token_id": t.token_id,
        "name": t.name,
        "role": role_name(t.role),
        "created_at": time(&t.created_at),
        "expires_at": time(&t.expires_at),
        "revoked_at": time(&t.revoked_at),
        "quotas": {
            "max_queued_jobs": limit(q.max_queued_jobs),
            "max_batch_jobs": limit(q.max_batch_jobs),
            "max_gpu_seconds_per_day": if q.max_gpu_seconds_per_day > 0.0 { json!(q.max_gpu_seconds_per_day) } else { Value::Null },
        },
    })
}

fn token_line(t: &pb::Token) -> String {
    let v = token_json(t);
    let status = if !v["revoked_at"].is_null() {
        "revoked".to_owned()
    } else if let Some(at) = v["expires_at"].as_str() {
        format!("expires {at}")
    } else {
        "no expiry".to_owned()
    };
    let quotas: Vec<String> = v["quotas"]
        .as_object()
        .map(|q| q.iter().filter(|(_, n)| !n.is_null()).map(|(k, n)| format!("{k}={n}")).collect())
        .unwrap_or_default();
    let quotas = if quotas.is_empty() { String::new() } else { format!("  {}", quotas.join(" ")) };
    format!("{}  {:<6}  {}  ({status}){quotas}", t.token_id, role_name(t.role), t.name)
}

/// Runs one `farmctl tokens` command; prints JSON with `json`.
///
/// # Errors
/// What the coordinator refused, explained.
pub async fn run(farm: &Farm, command: TokensCommand, json: bool) -> Result<()> {
    let mut admin = farm.admin();
    match command {
        TokensCommand::Create { name, role, expires_in, max_queued_jobs, max_batch_jobs, max_gpu_seconds_per_day } => {
            let request = pb::CreateTokenRequest {
                name,
                role: pb::TokenRole::from(role) as i32,
                expires_in_seconds: expires_in.unwrap_or(0),
                quotas: Some(pb::TokenQuotas {
                    max_queued_jobs: max_queued_jobs.unwrap_or(0),
                    max_batch_jobs: max_batch_jobs.unwrap_or(0),
                    max_gpu_seconds_per_day: max_gpu_seconds_per_day.unwrap_or(0.0),
                }),
            };
            let created = admin.create_token(request).await.map_err(|s| farm.explain(s))?.into_inner();
            let token = created.token.unwrap_or_default();
            if json {
                println!("{}", json!({ "token": token_json(&token), "secret": created.secret }));
            } else {
                eprintln!("{}", token_line(&token));
                eprintln!("the secret below is shown this once; store it now");
                println!("{}", created.secret);
            }
        }
        TokensCommand::List { all } => {
            let list = admin.list_tokens(pb::ListTokensRequest { include_dead: all }).await.map_err(|s| farm.explain(s))?.into_inner();
            if json {
                println!("{}", Value::Array(list.tokens.iter().map(token_json).collect()));
            } else if list.tokens.is_empty() {
                println!("no tokens");
            } else {
                for t in &list.tokens {
                    println!("{}", token_line(t));
                }
            }
        }
        TokensCommand::Revoke { token_id } => {
            let token = admin.revoke_token(pb::RevokeTokenRequest { token_id }).await.map_err(|s| farm.explain(s))?.into_inner();
            if json {
                println!("{}", token_json(&token));
            } else {
                println!("revoked {}", token_line(&token));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("45"), Ok(45));
        for bad in ["", "0d", "d", "3w", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
