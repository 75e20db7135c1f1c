//! `${VAR}` interpolation in string values. It runs after parsing, on values that already carry
//! their position, so an error points at the scalar that names the variable; `$${` writes a
//! literal `${`. A `$` not followed by `{` is kept as is (secrets and shell snippets contain
//! them).

/// The result of expanding one value.
#[derive(Debug, PartialEq, Eq)]
pub struct Expanded {
    pub text: String,
    /// Whether at least one `${VAR}` was substituted: a secret that came from the environment
    /// is not "written inline".
    pub substituted: bool,
}

/// Expands `${NAME}` references with `env`. The error message names the variable, never its
/// value.
pub fn expand(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Expanded, String> {
    let mut out = String::with_capacity(input.len());
    let mut substituted = false;
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(close) = tail.find('}') else {
                return Err(
                    "unterminated `${`: write ${NAME}, or $${ for a literal `${`".to_string(),
                );
            };
            let name = &tail[..close];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`${{{name}}}` is not a valid variable reference: names are letters, digits and _ (write $${{ for a literal `${{`)"
                ));
            }
            match env(name) {
                Some(value) => out.push_str(&value),
                None => return Err(format!("environment variable `{name}` is not set")),
            }
            substituted = true;
            rest = &tail[close + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(Expanded {
        text: out,
        substituted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            "DOLLAR" => Some("${A}".into()),
            _ => None,
        }
    }

    fn ok(input: &str) -> (String, bool) {
        let e = expand(input, &env).unwrap();
        (e.text, e.substituted)
    }

    #[test]
    fn substitutes_variables() {
        assert_eq!(ok("${A}"), ("alpha".into(), true));
        assert_eq!(ok("x-${A}-${A}/y"), ("x-alpha-alpha/y".into(), true));
        assert_eq!(ok("${EMPTY}"), (String::new(), true));
    }

    #[test]
    fn leaves_plain_text_and_lone_dollars() {
        assert_eq!(ok("plain"), ("plain".into(), false));
        assert_eq!(ok("a$b$"), ("a$b$".into(), false));
        assert_eq!(ok("{user}"), ("{user}".into(), false));
    }

    #[test]
    fn double_dollar_escapes() {
        assert_eq!(ok("$${A}"), ("${A}".into(), false));
        // Left to right: a lone `$`, then the escape.
        assert_eq!(ok("$$${A}"), ("$${A}".into(), false));
    }

    #[test]
    fn values_are_not_expanded_again() {
        assert_eq!(ok("${DOLLAR}"), ("${A}".into(), true));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = expand("x${NOPE}", &env).unwrap_err();
        assert!(e.contains("`NOPE`"), "{e}");
        assert!(expand("${A", &env).unwrap_err().contains("unterminated"));
        assert!(expand("${1A}", &env).unwrap_err().contains("not a valid"));
        assert!(expand("${}", &env).unwrap_err().contains("not a valid"));
    }
}
