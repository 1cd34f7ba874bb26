//! Exact evaluation of arithmetic expressions (`+ - * /`, parentheses, integers) over rationals,
//! for the countdown verifier.

/// A rational number `num / den` with `den > 0`, in lowest terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    /// Numerator.
    pub num: i64,
    /// Denominator (positive).
    pub den: i64,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a.abs() } else { gcd(b, a % b) }
}

impl Rational {
    fn new(num: i64, den: i64) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let s = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: s * num / g,
            den: s * den / g,
        })
    }

    /// The value as an integer, if it is one.
    pub fn as_integer(self) -> Option<i64> {
        (self.den == 1).then_some(self.num)
    }
}

/// A parsed and evaluated expression: its value and the integer literals it used, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluated {
    /// The exact value.
    pub value: Rational,
    /// The integer literals in the expression.
    pub numbers: Vec<i64>,
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    numbers: Vec<i64>,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.at).is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.at).copied()
    }
    fn expr(&mut self) -> Option<Rational> {
        let mut v = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            let r = self.term()?;
            let (a, b) = (v.num.checked_mul(r.den)?, r.num.checked_mul(v.den)?);
            let num = if op == b'+' {
                a.checked_add(b)?
            } else {
                a.checked_sub(b)?
            };
            v = Rational::new(num, v.den.checked_mul(r.den)?)?;
        }
        Some(v)
    }
    fn term(&mut self) -> Option<Rational> {
        let mut v = self.factor()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.at += 1;
            let r = self.factor()?;
            v = if op == b'*' {
                Rational::new(v.num.checked_mul(r.num)?, v.den.checked_mul(r.den)?)?
            } else {
                Rational::new(v.num.checked_mul(r.den)?, v.den.checked_mul(r.num)?)?
            };
        }
        Some(v)
    }
    fn factor(&mut self) -> Option<Rational> {
        match self.peek()? {
            b'(' => {
                self.at += 1;
                let v = self.expr()?;
                (self.peek()? == b')').then(|| self.at += 1)?;
                Some(v)
            }
            c if c.is_ascii_digit() => {
                let start = self.at;
                while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
                    self.at += 1;
                }
                let n: i64 = std::str::from_utf8(&self.s[start..self.at])
                    .ok()?
                    .parse()
                    .ok()?;
                self.numbers.push(n);
                Rational::new(n, 1)
            }
            _ => None,
        }
    }
}

/// Parses and evaluates `text` exactly; `None` if it is not a well-formed expression (or divides
/// by zero, or overflows).
pub fn evaluate(text: &str) -> Option<Evaluated> {
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
        numbers: Vec::new(),
    };
    let value = p.expr()?;
    (p.peek().is_none()).then_some(Evaluated {
        value,
        numbers: p.numbers,
    })
}
