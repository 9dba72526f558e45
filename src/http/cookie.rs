//! Reading the token cookie from `Cookie` headers and writing `Set-Cookie`: pure
//! functions over header text.

use std::time::Duration;

use crate::http::config::SameSite;

/// Most token candidates read from one request: a bound on the work a request can cause.
pub(crate) const MAX_CANDIDATES: usize = 4;

/// The values of every cookie called `name` in the `Cookie` header values `headers`
/// (browsers send one header, HTTP/2 clients may split it), surrounding double quotes
/// removed, at most [`MAX_CANDIDATES`].
pub(crate) fn cookie_values<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(move |pair| {
            let (n, v) = pair.split_once('=')?;
            (n.trim() == name).then(|| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
        })
        .take(MAX_CANDIDATES)
}

/// The cookie attributes after the value, computed once per layer:
/// `; Max-Age=600; Path=/; Secure; HttpOnly; SameSite=Lax`.
pub(crate) fn cookie_attributes(
    max_age: Duration,
    path: &str,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
) -> String {
    let mut out = format!("; Max-Age={}; Path={path}", max_age.as_secs());
    if secure {
        out.push_str("; Secure");
    }
    if http_only {
        out.push_str("; HttpOnly");
    }
    out.push_str("; SameSite=");
    out.push_str(same_site.as_str());
    out
}

/// A whole `Set-Cookie` value.
pub(crate) fn set_cookie(name: &str, value: &str, attributes: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1 + value.len() + attributes.len());
    out.push_str(name);
    out.push('=');
    out.push_str(value);
    out.push_str(attributes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_cookie_among_others() {
        let headers = ["a=1; pgfleet_token=v1.x.sig; b=2", "pgfleet_token=\"q\""];
        let got: Vec<&str> = cookie_values(headers, "pgfleet_token").collect();
        assert_eq!(got, ["v1.x.sig", "q"]);
        // Names match exactly: no prefix, suffix or case folding.
        let headers = ["xpgfleet_token=1; pgfleet_token2=2; PGFLEET_TOKEN=3; pgfleet_token"];
        assert_eq!(cookie_values(headers, "pgfleet_token").count(), 0);
        // Bounded.
        let many = ["t=1; t=2; t=3; t=4; t=5; t=6"];
        assert_eq!(cookie_values(many, "t").count(), MAX_CANDIDATES);
        // Values may contain `=`.
        assert_eq!(cookie_values(["t=a=b"], "t").collect::<Vec<_>>(), ["a=b"]);
    }

    #[test]
    fn formats_set_cookie() {
        let attrs = cookie_attributes(Duration::from_secs(600), "/", true, true, SameSite::Lax);
        assert_eq!(
            set_cookie("pgfleet_token", "v1.1.1.0/1.mac", &attrs),
            "pgfleet_token=v1.1.1.0/1.mac; Max-Age=600; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        let attrs = cookie_attributes(
            Duration::from_millis(90_500),
            "/app",
            false,
            false,
            SameSite::Strict,
        );
        assert_eq!(attrs, "; Max-Age=90; Path=/app; SameSite=Strict");
        let attrs = cookie_attributes(Duration::from_secs(1), "/", true, false, SameSite::None);
        assert_eq!(attrs, "; Max-Age=1; Path=/; Secure; SameSite=None");
    }
}
