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
/// by [`MASK`].
pub fn mask<'a>(text: &'a str, also: Option<&SecretString>) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    let mut hide = |value: &str| {
        if value.len() >= MIN_LEN && out.contains(value) {
            out = Cow::Owned(out.replace(value, MASK));
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
    }
}
