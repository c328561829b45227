//! Symbolic dimensions: a known size, or a monomial of the model's dim symbols with a rational
//! coefficient (`height*width/64`, `2*batch`). Enough for diffusion graphs, whose sizes are
//! products and exact quotients of the input dims.
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    /// `num/den * Π symbol^power` (den > 0, reduced, powers > 0, at least one symbol).
    Sym {
        num: i64,
        den: i64,
        symbols: BTreeMap<String, u32>,
    },
}

fn gcd(a: i64, b: i64) -> i64 {
    // i64::MIN has no positive counterpart: 1 keeps the fraction as it is.
    if b == 0 {
        a.checked_abs().unwrap_or(1)
    } else {
        gcd(b, a.wrapping_rem(b))
    }
}

impl Dim {
    pub fn symbol(name: &str) -> Dim {
        Dim::Sym {
            num: 1,
            den: 1,
            symbols: BTreeMap::from([(name.to_string(), 1)]),
        }
    }

    /// A size nothing is known about; each call site gives a distinct `id`.
    pub fn unknown(id: usize) -> Dim {
        Dim::symbol(&format!("?{id}"))
    }

    /// The same with each symbol replaced by `rename`'s choice (powers of symbols that become
    /// one add up).
    pub fn renamed(&self, rename: impl Fn(&str) -> String) -> Dim {
        match self {
            Dim::Known(_) => self.clone(),
            Dim::Sym { num, den, symbols } => {
                let mut renamed: BTreeMap<String, u32> = BTreeMap::new();
                for (s, p) in symbols {
                    let power = renamed.entry(rename(s)).or_default();
                    *power = power.saturating_add(*p);
                }
                Dim::Sym {
                    num: *num,
                    den: *den,
                    symbols: renamed,
                }
            }
        }
    }

    /// The symbol, if the dim is exactly one (coefficient 1, power 1).
    pub fn as_symbol(&self) -> Option<&str> {
        match self {
            Dim::Sym {
                num: 1,
                den: 1,
                symbols,
            } if symbols.len() == 1 => symbols
                .iter()
                .next()
                .filter(|(_, p)| **p == 1)
                .map(|(s, _)| s.as_str()),
            _ => None,
        }
    }

    /// Is it (a multiple of) a size nothing is known about?
    pub fn is_unknown(&self) -> bool {
        matches!(self, Dim::Sym { symbols, .. } if symbols.keys().any(|s| s.starts_with('?')))
    }

    /// A declared dim: `8*height` → 8·height; anything else becomes one opaque symbol.
    pub fn parse(p: &str) -> Dim {
        let mut d = Dim::Known(1);
        for part in p.split('*').map(str::trim) {
            let factor = match part.parse::<i64>() {
                Ok(v) => Dim::Known(v),
                Err(_)
                    if !part.is_empty()
                        && part.chars().all(|c| c.is_alphanumeric() || c == '_') =>
                {
                    Dim::symbol(part)
                }
                Err(_) => return Dim::symbol(p),
            };
            d = d.mul(&factor).unwrap_or_else(|| Dim::symbol(p));
        }
        d
    }

    /// The dim with the symbols `values` names replaced by their sizes (`None` where a
    /// quotient does not come out whole).
    pub fn substitute(&self, values: &BTreeMap<String, i64>) -> Option<Dim> {
        let Dim::Sym { num, den, symbols } = self else {
            return Some(self.clone());
        };
        let mut num = *num;
        let mut rest = BTreeMap::new();
        for (s, p) in symbols {
            match values.get(s) {
                Some(v) => num = num.checked_mul(v.checked_pow(*p)?)?,
                None => {
                    rest.insert(s.clone(), *p);
                }
            }
        }
        Dim::from_parts(num, *den, rest)
    }

    /// The symbols it mentions, with their powers.
    pub fn symbols(&self) -> impl Iterator<Item = (&str, u32)> {
        let symbols = match self {
            Dim::Sym { symbols, .. } => Some(symbols),
            Dim::Known(_) => None,
        };
        symbols.into_iter().flatten().map(|(s, p)| (s.as_str(), *p))
    }

    pub fn known(&self) -> Option<i64> {
        match self {
            Dim::Known(v) => Some(*v),
            Dim::Sym { .. } => None,
        }
    }

    fn parts(&self) -> (i64, i64, BTreeMap<String, u32>) {
        match self {
            Dim::Known(v) => (*v, 1, BTreeMap::new()),
            Dim::Sym { num, den, symbols } => (*num, *den, symbols.clone()),
        }
    }

    fn from_parts(num: i64, den: i64, symbols: BTreeMap<String, u32>) -> Option<Dim> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg()?;
            den = den.checked_neg()?;
        }
        if symbols.is_empty() {
            return (den == 1).then_some(Dim::Known(num));
        }
        if num == 0 {
            return Some(Dim::Known(0));
        }
        Some(Dim::Sym { num, den, symbols })
    }

    pub fn mul(&self, other: &Dim) -> Option<Dim> {
        let (n1, d1, mut s1) = self.parts();
        let (n2, d2, s2) = other.parts();
        for (k, p) in s2 {
            *s1.entry(k).or_default() += p;
        }
        Dim::from_parts(n1.checked_mul(n2)?, d1.checked_mul(d2)?, s1)
    }

    /// Exact division (sizes are assumed to divide, as they do in a well-formed model).
    pub fn div(&self, other: &Dim) -> Option<Dim> {
        let (n1, d1, mut s1) = self.parts();
        let (n2, d2, s2) = other.parts();
        for (k, p) in s2 {
            let e = s1.get_mut(&k)?;
            if *e < p {
                return None;
            }
            *e -= p;
            if *e == 0 {
                s1.remove(&k);
            }
        }
        if n2 == 0 {
            return None;
        }
        Dim::from_parts(n1.checked_mul(d2)?, d1.checked_mul(n2)?, s1)
    }

    /// Sum; symbolic only when both sides are the same monomial up to the coefficient.
    pub fn add(&self, other: &Dim) -> Option<Dim> {
        let (n1, d1, s1) = self.parts();
        let (n2, d2, s2) = other.parts();
        if s1 != s2 {
            return None;
        }
        Dim::from_parts(
            n1.checked_mul(d2)?.checked_add(n2.checked_mul(d1)?)?,
            d1.checked_mul(d2)?,
            s1,
        )
    }

    pub fn neg(&self) -> Option<Dim> {
        let (n, d, s) = self.parts();
        Dim::from_parts(n.checked_neg()?, d, s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            d if d.is_unknown() => write!(f, "?"),
            Dim::Sym { num, den, symbols } => {
                let mut parts: Vec<String> = Vec::new();
                if *num != 1 {
                    parts.push(num.to_string());
                }
                for (s, p) in symbols {
                    for _ in 0..*p {
                        parts.push(s.clone());
                    }
                }
                write!(f, "{}", parts.join("*"))?;
                if *den != 1 {
                    write!(f, "/{den}")?;
                }
                Ok(())
            }
        }
    }
}

impl serde::Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Dim::Known(v) => s.serialize_i64(*v),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let h = Dim::symbol("height");
        let w = Dim::symbol("width");
        let hw = h.mul(&w).unwrap();
        let q = hw.div(&Dim::Known(64)).unwrap();
        assert_eq!(q.to_string(), "height*width/64");
        assert_eq!(q.mul(&Dim::Known(64)).unwrap(), hw);
        assert_eq!(hw.div(&h).unwrap(), w);
        assert_eq!(Dim::Known(12).div(&Dim::Known(4)), Some(Dim::Known(3)));
        assert_eq!(Dim::Known(7).div(&Dim::Known(2)), None);
        assert_eq!(h.add(&h).unwrap().to_string(), "2*height");
        assert_eq!(h.add(&w), None);
    }

    #[test]
    fn substitution() {
        let values = BTreeMap::from([("height".to_string(), 64), ("batch".to_string(), 2)]);
        let q = Dim::parse("height").mul(&Dim::parse("width")).unwrap();
        let q = q.div(&Dim::Known(64)).unwrap();
        assert_eq!(q.substitute(&values).unwrap().to_string(), "width");
        let d = Dim::parse("8*height");
        assert_eq!(d.substitute(&values), Some(Dim::Known(512)));
        let odd = Dim::parse("height").div(&Dim::Known(3)).unwrap();
        assert_eq!(odd.substitute(&values), None, "64/3 is not a size");
        assert_eq!(Dim::Known(5).substitute(&values), Some(Dim::Known(5)));
    }
}
