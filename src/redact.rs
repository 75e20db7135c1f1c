//! The credentials keyward holds (each provider account's API key or key secret, Okta ASA
//! bearer tokens), kept so that anything keyward quotes from elsewhere (a sink program's
//! output, a provider's error body, an error chain) can be masked before it is printed. The
//! copies are zeroized when replaced or dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{LazyLock, RwLock};

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

/// What a masked credential is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Shorter values are not masked: they would garble ordinary text, and no credential is this
/// short.
const MIN_LEN: usize = 6;

static HELD: LazyLock<RwLock<BTreeMap<String, Zeroizing<String>>>> =
    LazyLock::new(|| RwLock::new(BTreeMap::new()));

/// Remembers `secret` under `name` (replacing what that name held) so that [`mask`] hides it.
pub fn remember(name: &str, secret: &SecretString) {
    let value = secret.expose_secret();
    if let Ok(mut held) = HELD.write() {
        if value.len() < MIN_LEN {
            held.remove(name);
        } else {
            held.insert(name.to_string(), Zeroizing::new(value.to_string()));
        }
    }
}

/// `text` with every credential keyward holds, and `also` (a secret being delivered), replaced
/// by [`MASK`]: as written, percent-encoded (a URL or form body) and JSON-escaped.
pub fn mask<'a>(text: &'a str, also: Option<&SecretString>) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    let mut hide = |value: &str| {
        if value.len() < MIN_LEN {
            return;
        }
        let encoded = Zeroizing::new(
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>(),
        );
        let escaped = Zeroizing::new(
            serde_json::to_string(value)
                .map(|q| q.trim_matches('"').to_string())
                .unwrap_or_default(),
        );
        // Some encoders write `/` as `\/` in JSON.
        let slashed = Zeroizing::new(escaped.replace('/', "\\/"));
        for form in [value, encoded.as_str(), escaped.as_str(), slashed.as_str()] {
            if !form.is_empty() && out.contains(form) {
                out = Cow::Owned(out.replace(form, MASK));
            }
        }
    };
    if let Some(s) = also {
        hide(s.expose_secret());
    }
    if let Ok(held) = HELD.read() {
        for value in held.values() {
            hide(value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_held_and_given_secrets() {
        remember(
            "test.a",
            &SecretString::from("held-credential-1".to_string()),
        );
        let extra = SecretString::from("delivered-secret".to_string());
        let got = mask(
            "x held-credential-1 y delivered-secret z short",
            Some(&extra),
        );
        assert_eq!(got, "x [REDACTED] y [REDACTED] z short");
        remember(
            "test.a",
            &SecretString::from("other-credential".to_string()),
        );
        assert_eq!(mask("held-credential-1", None), "held-credential-1");
        assert!(matches!(mask("nothing here", None), Cow::Borrowed(_)));
        // Encoded as a program or a page might print it.
        remember("test.b", &SecretString::from("a/b+c=d-secret".to_string()));
        assert_eq!(mask("x a%2Fb%2Bc%3Dd-secret y", None), "x [REDACTED] y");
        assert!(!mask(r"x a\/b+c=d-secret y", None).contains("secret"));
        // Too short to mask without garbling every message.
        assert_eq!(
            mask("answered s", Some(&SecretString::from("s".to_string()))),
            "answered s"
        );
    }
}
