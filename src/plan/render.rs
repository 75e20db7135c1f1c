//! Shows a plan to people (Terraform-style text, one line per change, grouped by provider and
//! user) and to programs (one JSON document). Rendering never decides anything: it only reads
//! the plan.

use std::collections::HashMap;

use anstyle::{AnsiColor, Style};

use super::diff::short_id;
use super::{Action, Change, Plan, Upcoming, Warning};
use crate::text::escape;

const WIDTH: usize = 26;
/// The human plan lists this many upcoming events, soonest first.
const UPCOMING_SHOWN: usize = 10;

fn upcoming_line(u: &Upcoming, now: jiff::Timestamp) -> String {
    let when = format!(
        "in {} ({})",
        crate::duration::humanize(u.at.duration_since(now)),
        u.at.strftime("%Y-%m-%d %H:%M UTC")
    );
    match u.action {
        Action::RevokeKey => format!(
            "{} / {}: revoke key {} {when}, when its overlap ends",
            u.provider,
            u.user,
            u.key_id.as_deref().map(short_id).unwrap_or_default()
        ),
        _ => format!(
            "{} / {}: next rotation of {} {when}",
            u.provider,
            u.user,
            u.slot.as_deref().unwrap_or("")
        ),
    }
}

fn paint(text: &str, color: Option<AnsiColor>, enabled: bool) -> String {
    match (color, enabled) {
        (Some(c), true) => {
            let style = Style::new().fg_color(Some(c.into()));
            format!("{style}{text}{style:#}")
        }
        _ => text.to_string(),
    }
}

fn bold(text: &str, enabled: bool) -> String {
    if enabled {
        let style = Style::new().bold();
        format!("{style}{text}{style:#}")
    } else {
        text.to_string()
    }
}

fn change_line(c: &Change) -> (&'static str, Option<AnsiColor>, String, String) {
    let slot = c.slot.as_deref().unwrap_or("");
    let key = c.key_id.as_deref().map(short_id).unwrap_or_default();
    match c.action {
        Action::CreateUser => {
            let inactive = c
                .after
                .as_ref()
                .and_then(|a| a.get("active"))
                .and_then(|v| v.as_bool())
                == Some(false);
            let mut detail = c.reason.clone();
            if inactive {
                detail = if detail.is_empty() {
                    "active: false".into()
                } else {
                    format!("active: false; {detail}")
                };
            }
            (
                "+",
                Some(AnsiColor::Green),
                "create service user".into(),
                detail,
            )
        }
        Action::UpdateUser => (
            "~",
            Some(AnsiColor::Yellow),
            "update service user".into(),
            c.reason.clone(),
        ),
        Action::DeleteUser => (
            "-",
            Some(AnsiColor::Red),
            "delete service user".into(),
            c.reason.clone(),
        ),
        Action::CreateKey => {
            let sinks: Vec<String> = c
                .after
                .as_ref()
                .and_then(|a| a.get("sinks"))
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let detail = match sinks.len() {
                0 => String::new(),
                1 => format!("-> sink {}", sinks[0]),
                _ => format!("-> sinks {}", sinks.join(", ")),
            };
            let detail =
                if c.reason.is_empty() || c.reason == "new slot" || c.reason == "no current key" {
                    detail
                } else {
                    format!("{detail} ({})", c.reason)
                };
            (
                "+",
                Some(AnsiColor::Green),
                format!("create key {slot}"),
                detail,
            )
        }
        Action::RotateKey => (
            "↻",
            Some(AnsiColor::Cyan),
            format!("rotate key {slot}"),
            c.reason.clone(),
        ),
        Action::RevokeKey => (
            "-",
            Some(AnsiColor::Red),
            format!("revoke key {key}"),
            c.reason.clone(),
        ),
    }
}

fn warning_line(w: &Warning) -> (String, String) {
    match w.kind.as_str() {
        "unknown_key" => {
            let key = w.key_id.as_deref().map(short_id).unwrap_or_default();
            let detail = w
                .message
                .split_once("was ")
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_else(|| w.message.clone());
            (format!("unknown key {key}"), detail)
        }
        "unmanaged_user" => ("unmanaged service user".into(), w.message.clone()),
        "pruned_user_kept" => ("kept service user".into(), w.message.clone()),
        _ => (w.kind.replace('_', " "), w.message.clone()),
    }
}

fn line(
    out: &mut String,
    symbol: &str,
    color: Option<AnsiColor>,
    what: &str,
    detail: &str,
    colored: bool,
) {
    // Names, ids and reasons come from the config and the provider: one line each, always.
    let (what, detail) = (escape(what), escape(detail));
    let head = if detail.is_empty() {
        what.to_string()
    } else {
        format!("{what:<WIDTH$} {detail}")
    };
    out.push_str(&format!(
        "    {} {}\n",
        paint(symbol, color, colored),
        head.trim_end()
    ));
}

/// The human form of a plan.
pub fn text(plan: &Plan, colored: bool) -> String {
    let mut out = String::new();
    if plan.has_changes() {
        out.push_str(&bold(
            "keyward will perform the following actions:",
            colored,
        ));
        out.push('\n');
    } else {
        out.push_str(&bold(
            "No changes. The provider accounts match the configuration.",
            colored,
        ));
        out.push('\n');
    }

    // Groups in the order the planner put the changes (the file's order), warnings joining
    // their user's group: one pass over each list, whatever the size of the account.
    type Group<'p> = (Vec<&'p Change>, Vec<&'p Warning>);
    let mut order: Vec<(&str, &str)> = Vec::new();
    let mut groups: HashMap<(&str, &str), Group> = HashMap::new();
    for c in &plan.changes {
        let k = (c.provider.as_str(), c.user.as_str());
        groups
            .entry(k)
            .or_insert_with(|| {
                order.push(k);
                Default::default()
            })
            .0
            .push(c);
    }
    let mut loose = Vec::new();
    for w in &plan.warnings {
        let Some(user) = w.user.as_deref() else {
            loose.push(w);
            continue;
        };
        let k = (w.provider.as_deref().unwrap_or_default(), user);
        groups
            .entry(k)
            .or_insert_with(|| {
                order.push(k);
                Default::default()
            })
            .1
            .push(w);
    }
    if !order.is_empty() {
        out.push('\n');
    }
    for k in &order {
        let (provider, user) = *k;
        out.push_str(&format!(
            "  {}\n",
            bold(&escape(&format!("{provider} / {user}")), colored)
        ));
        let Some((changes, warnings)) = groups.get(k) else {
            continue;
        };
        for c in changes {
            let (sym, color, what, detail) = change_line(c);
            line(&mut out, sym, color, &what, &detail, colored);
        }
        for w in warnings {
            let (what, detail) = warning_line(w);
            line(
                &mut out,
                "!",
                Some(AnsiColor::Yellow),
                &what,
                &detail,
                colored,
            );
        }
    }
    if !loose.is_empty() {
        out.push('\n');
        for w in loose {
            out.push_str(&format!(
                "  {} {}\n",
                paint("!", Some(AnsiColor::Yellow), colored),
                escape(&w.message)
            ));
        }
    }
    if !plan.upcoming.is_empty() {
        out.push('\n');
        out.push_str(&bold("Upcoming (nothing to do now):", colored));
        out.push('\n');
        for u in plan.upcoming.iter().take(UPCOMING_SHOWN) {
            out.push_str(&format!(
                "  {}\n",
                escape(&upcoming_line(u, plan.planned_at))
            ));
        }
        if plan.upcoming.len() > UPCOMING_SHOWN {
            out.push_str(&format!(
                "  … and {} more (see `keyward status`)\n",
                plan.upcoming.len() - UPCOMING_SHOWN
            ));
        }
    }
    out.push('\n');
    // Counted from the changes themselves, never taken from a plan file's own summary.
    let s = &super::Summary::of(&plan.changes, plan.warnings.len());
    let warnings = match s.warnings {
        0 => String::new(),
        1 => " 1 warning.".to_string(),
        n => format!(" {n} warnings."),
    };
    if plan.has_changes() {
        let mut counts = format!(
            "Plan: {} to create, {} to update, {} to rotate, {} to revoke",
            s.create, s.update, s.rotate, s.revoke
        );
        if s.delete > 0 {
            counts.push_str(&format!(", {} to delete", s.delete));
        }
        out.push_str(&format!("{}.{warnings}\n", bold(&counts, colored)));
    } else if !warnings.is_empty() {
        out.push_str(&format!("{}\n", warnings.trim_start()));
    } else {
        // Nothing more to say; drop the blank line before the (absent) footer.
        out.pop();
    }
    out
}

/// The JSON form: exactly one document.
pub fn json(plan: &Plan) -> String {
    let mut s = serde_json::to_string_pretty(plan).unwrap_or_else(|_| "{}".to_string());
    s.push('\n');
    s
}
