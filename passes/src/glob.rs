//! Module-path globs for selecting layers: `up_blocks.*`, `*attn1`, `*.attn2,mid_block.*`.

/// A comma-separated list of globs; `*` matches any run of characters (dots included), `?` one.
#[derive(Clone, Debug)]
pub struct Globs(Vec<String>);

impl Globs {
    pub fn parse(text: &str) -> Globs {
        Globs(
            text.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.iter().any(|g| glob(g.as_bytes(), path.as_bytes()))
    }

    /// Each glob of the list on its own (to say which one matched nothing).
    pub fn each(&self) -> impl Iterator<Item = Globs> + '_ {
        self.0.iter().map(|g| Globs(vec![g.clone()]))
    }
}

impl std::fmt::Display for Globs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.join(","))
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Globs::parse("up_blocks.*, *.attn1");
        assert!(g.matches("up_blocks.1.attentions.0.transformer_blocks.0.attn2"));
        assert!(g.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1"));
        assert!(!g.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn2"));
        assert!(
            Globs::parse("mid_block.attentions.?.*")
                .matches("mid_block.attentions.0.transformer_blocks.0.attn1")
        );
    }
}
