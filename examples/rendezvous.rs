//! Rendezvous hashing at 3, 10 and 100 members over a million keys: how evenly keys spread
//! (the most one member owns ÷ the mean) and the share of keys that move when one member
//! joins and when one leaves (ideal: 1/(N+1) and 1/N). The README's table comes from here:
//! `cargo run --release --example rendezvous`.

fn main() {
    let keys = 1_000_000;
    println!("members  spread(max/mean)  moved on join (ideal)  moved on leave (ideal)");
    for members in [3, 10, 100] {
        let s = edgecache::cluster::ring::simulate(members, keys);
        println!(
            "{members:>7}  {:>16.3}  {:>12.2}% ({:.2}%)  {:>13.2}% ({:.2}%)",
            s.spread,
            s.moved_on_join * 100.0,
            100.0 / (members + 1) as f64,
            s.moved_on_leave * 100.0,
            100.0 / members as f64,
        );
    }
}
