//! Shows a plan to people (Terraform-style text, one line per change, grouped by provider and
//! user) and to programs (one JSON document). Rendering never decides anything: it only reads
//! the plan.

use std::collections::HashMap;

use anstyle::{AnsiColor, Style};

use super::{Action, Change, CreateKeyReason, Op, Plan, Upcoming, Warning, WarningKind};
use crate::text::{escape, short_id};

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
            "{} / {}: next rotation of {} {when}{}",
            u.provider,
            u.user,
            u.slot.as_deref().unwrap_or(""),
            if u.reason.contains("adopted key") {
                " (adopted key)"
            } else {
                ""
            }
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

fn change_line(
    c: &Change,
    now: jiff::Timestamp,
) -> (&'static str, Option<AnsiColor>, String, String) {
    let reason = c.reason(now);
    match &c.op {
        Op::CreateUser { active, .. } => {
            let detail = match (active, reason.is_empty()) {
                (true, _) => reason,
                (false, true) => "active: false".into(),
                (false, false) => format!("active: false; {reason}"),
            };
            (
                "+",
                Some(AnsiColor::Green),
                "create service user".into(),
                detail,
            )
        }
        Op::UpdateUser { .. } => (
            "~",
            Some(AnsiColor::Yellow),
            "update service user".into(),
            reason,
        ),
        Op::UpdateKey { slot, .. } => (
            "~",
            Some(AnsiColor::Yellow),
            format!("update key {slot}"),
            reason,
        ),
        Op::DeleteUser { .. } => (
            "-",
            Some(AnsiColor::Red),
            "delete service user".into(),
            reason,
        ),
        Op::CreateKey { slot, why } => {
            let sinks = &slot.spec.sinks;
            let detail = match sinks.len() {
                0 => String::new(),
                1 => format!("-> sink {}", sinks[0]),
                _ => format!("-> sinks {}", sinks.join(", ")),
            };
            let detail = match why {
                CreateKeyReason::NewSlot | CreateKeyReason::NoCurrentKey => detail,
                CreateKeyReason::CurrentVanished { .. } => format!("{detail} ({reason})"),
            };
            (
                "+",
                Some(AnsiColor::Green),
                format!("create key {}", slot.spec.name),
                detail,
            )
        }
        Op::RotateKey { slot, .. } => (
            "↻",
            Some(AnsiColor::Cyan),
            format!("rotate key {}", slot.spec.name),
            reason,
        ),
        Op::RevokeKey { key, .. } => (
            "-",
            Some(AnsiColor::Red),
            format!("revoke key {}", short_id(&key.id)),
            reason,
        ),
    }
}

fn warning_line(w: &Warning) -> (String, String) {
    match w.kind {
        WarningKind::UnknownKey => {
            let key = w.key_id.as_deref().map(short_id).unwrap_or_default();
            (format!("unknown key {key}"), w.detail.clone())
        }
        WarningKind::ForeignKey | WarningKind::AdoptedKey | WarningKind::UntrackedKey => {
            let key = w.key_id.as_deref().map(short_id).unwrap_or_default();
            let word = w.kind.as_str().trim_end_matches("_key");
            (format!("{word} key {key}"), w.detail.clone())
        }
        WarningKind::UnmanagedUser => ("unmanaged service user".into(), w.detail.clone()),
        WarningKind::PrunedUserKept => ("kept service user".into(), w.detail.clone()),
        other => (other.as_str().replace('_', " "), w.detail.clone()),
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
    } else if !plan.errors.is_empty() {
        out.push_str(&bold(
            "No changes can be planned until the errors below are fixed in the file.",
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
            let (sym, color, what, detail) = change_line(c, plan.planned_at);
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
    if !plan.errors.is_empty() {
        out.push('\n');
        out.push_str(&bold(
            "Errors (nothing is planned for these users):",
            colored,
        ));
        out.push('\n');
        for e in &plan.errors {
            out.push_str(&format!(
                "  {} {}\n",
                paint("✗", Some(AnsiColor::Red), colored),
                e
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
    let s = &plan.summary();
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

/// The JSON form: exactly one document (see [`super::view`]).
pub fn json(plan: &Plan) -> String {
    super::view::json(plan)
}
